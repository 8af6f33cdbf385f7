"""The training loop shared by all stages: set-up, EMA, logging, checkpoints, resume (grids: previews.py)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from gear.align.repa import Projector
from gear.align.teachers import build_teacher
from gear.config import Config, save_config
from gear.data import build_dataset
from gear.data.bad_samples import substitutions
from gear.files import WriteError
from gear.losses.discriminator import PatchGANDiscriminator
from gear.losses.perceptual import build_perceptual_loss
from gear.train import checkpoint as ckpt
from gear.train import previews, sharding
from gear.train.bad_data import BadSampleLog
from gear.train.batches import StepBatch, batch_stream, restore_stream_state, stream_state
from gear.models.autoencoder import Tokenizer
from gear.train.build import LIVE_SUFFIX, TOKENIZER_DIR, generator_from_config, model_dir, tokenizer_from_config
from gear.train.distributed import DistEnv, all_reduce_mean, all_reduce_sum, any_process, barrier, setup_distributed
from gear.train.ema import EMA
from gear.train.code_store import CodeStore
from gear.train.guard import Diverged, RunStopped, StepGuard, Verdict, first_non_finite_tensor
from gear.train.preemption import StopSignals
from gear.train.steps import STEPS, DiscriminatorHinge, Modules, StepConfig, Updater, adamw, apply_all, ar_step_on_codes
from gear.train.targets import TeacherTargets
from gear.text.conditioner import TextConditioner


@dataclass
class RunSummary:
    run_dir: Path
    step: int
    metrics: dict[str, float]
    codebook_usage: float
    seconds: float
    stopped_by: str = ""     # the signal that stopped the run early (after writing its checkpoint)


def tap_layer(cfg: Config, n_layer: int) -> int:
    """The 1-based block whose output is aligned: ``align.tap_layer``, or n_layer // 3 when it is 0."""
    tap = cfg.align.tap_layer or max(1, n_layer // 3)
    if tap > n_layer:
        raise ValueError(f"align.tap_layer={tap} but the generator has {n_layer} layers")
    return tap


class Trainer:
    """Builds everything a config asks for; ``fit()`` runs (or continues) the stage to ``train.steps``."""

    def __init__(self, cfg: Config, resume: bool = False, env: DistEnv | None = None):
        self.cfg = cfg
        self.env = env or setup_distributed(cfg.train.device)
        self.device = self.env.device
        self.run_dir = Path(cfg.train.out_dir)
        self.stage = cfg.train.stage
        torch.manual_seed(cfg.train.seed)

        self.dataset = build_dataset(cfg.data, "train", seed=cfg.train.seed)
        self.num_classes = max(1, len(self.dataset.classes))  # captioned data without classes: one placeholder
        self.holdout = build_dataset(dataclasses.replace(cfg.data, limit=0), "test")
        # text conditioning: captions -> encoder features (cached on disk), and the prompts of the sample grids
        self.text = TextConditioner(cfg.text, getattr(self.dataset, "captions", None), self.device) if cfg.text.encoder else None
        if not resume and ckpt.has_checkpoint(self.run_dir):
            raise ValueError(f"{self.run_dir} already holds a run: continue it with --resume (or `gear resume`), "
                             "or choose another train.out_dir")
        self.resume = resume
        self.tap_layer = 0  # set when a generator is built
        self.m = self._build_modules()
        self.grid = cfg.data.image_size // self.m.tokenizer.downsample
        self.code_store = (CodeStore(cfg.data.code_store, self.dataset, cfg.data, self.m.tokenizer, self.m.teacher,
                                     bf16=isinstance(self._autocast(), torch.autocast)) if cfg.data.code_store else None)
        self.trained = self._trained_modules()
        self.emas = {name: EMA(mod, cfg.train.ema_decay) for name, mod in self.trained.items() if name in ("tokenizer", "generator")}
        self.sampling_generator: nn.Module | None = None  # under FSDP: rank 0's plain copy for grids and exports
        if cfg.train.parallel == "fsdp" and self.env.distributed:
            self._shard_generator()
        self.opts = self._build_optimizers()  # after sharding: FSDP replaces the parameters by DTensors
        self.wrapped = self._wrap_for_processes()
        self.step = 0
        self.targets = TeacherTargets(self.m.teacher, self.grid, self.device, cache=cfg.train.cache_teacher_features,
                                      store=self.code_store)
        self.fid_classifier = None  # the reference classifier of small_fid, loaded on first use
        self.usage_counts = torch.zeros(self.m.tokenizer.codebook_size, dtype=torch.long, device=self.device)
        self.guard = StepGuard(cfg.train.max_bad_steps)
        self.bad_data = BadSampleLog(self.dataset, self.run_dir, self.env.is_main)
        self.saved_step: int | None = None  # the step of the latest checkpoint
        if resume:
            resumed = ckpt.load_for_resume(self.run_dir)
            if resumed.note and self.env.is_main:
                print(resumed.note, file=sys.stderr)
            self._load(resumed.payload)

    # ------------------------------------------------------------------ set-up

    def _build_modules(self) -> Modules:
        cfg, dev = self.cfg, self.device
        if self.resume and self.stage == "ar":
            # the frozen tokenizer this run started with, not whatever model.tokenizer_init holds today
            tokenizer = Tokenizer.from_pretrained(model_dir(self.run_dir, TOKENIZER_DIR)).to(dev)
        else:
            tokenizer = tokenizer_from_config(cfg).to(dev)
        m = Modules(tokenizer=tokenizer)
        uses_ar = self.stage in ("joint", "ar")
        uses_align = (self.stage == "joint" and (cfg.align.lambda_tok > 0 or cfg.align.lambda_ar > 0)) or (
            self.stage == "ar" and cfg.align.lambda_ar > 0
        )
        if uses_ar:
            null = self.text.null if self.text is not None else None
            m.generator = generator_from_config(cfg, tokenizer, self.num_classes, null).to(dev)
            self.tap_layer = tap_layer(cfg, m.generator.config.n_layer)
        if uses_align:
            m.teacher = build_teacher(cfg.align.teacher, path=cfg.align.teacher_path or None).to(dev)
            m.projector = Projector(m.generator.config.dim, m.teacher.feature_dim, cfg.align.projector_dim).to(dev)
        if self.stage in ("tokenizer", "joint"):
            if cfg.loss.perceptual_weight > 0:
                m.perceptual = build_perceptual_loss(
                    cfg.loss.perceptual, vgg_path=cfg.loss.lpips_vgg_path or None, lpips_path=cfg.loss.lpips_heads_path or None
                ).to(dev)
            if cfg.loss.gan_weight > 0:
                m.discriminator = PatchGANDiscriminator(channels=cfg.loss.disc_channels, n_layers=cfg.loss.disc_layers).to(dev)
                if self.env.distributed and dev.type == "cuda":  # SyncBatchNorm is CUDA-only; on CPU, per-process stats
                    m.discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(m.discriminator)
                m.discriminator_loss = DiscriminatorHinge(m.discriminator)
        if self.stage == "ar":
            tokenizer.eval().requires_grad_(False)
        if cfg.train.grad_checkpointing and m.generator is not None:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

            from gear.models.gpt import Block
            from gear.models.gpt_t2i import TextBlock

            # wraps each block; the wrapper strips its own prefix from state dicts, so checkpoints stay plain
            apply_activation_checkpointing(m.generator, check_fn=lambda mod: isinstance(mod, (Block, TextBlock)))
        if cfg.train.compile:  # in place: parameter names and state dicts stay those of the plain modules
            for mod in (m.tokenizer, m.generator, m.discriminator):
                if mod is not None:
                    mod.compile()
        return m

    def _trained_modules(self) -> dict[str, nn.Module]:
        m = self.m
        mods = {
            "tokenizer": m.tokenizer if self.stage in ("tokenizer", "joint") else None,
            "generator": m.generator,
            "projector": m.projector,
            "discriminator": m.discriminator,
        }
        return {k: v for k, v in mods.items() if v is not None}

    def _build_optimizers(self) -> dict[str, Updater]:
        o = self.cfg.optim
        groups = {
            "tokenizer": ["tokenizer"],
            "generator": ["generator", "projector"],  # the projector learns with the AR (frozen in the tokenizer update)
            "discriminator": ["discriminator"],
        }
        opts = {}
        micro = self.cfg.train.batch_size // self.env.world_size
        if self.cfg.train.batch_size % self.env.world_size or micro % self.cfg.train.grad_accum_steps:
            raise ValueError(f"train.batch_size={self.cfg.train.batch_size} must split evenly over {self.env.world_size} "
                             f"processes x train.grad_accum_steps={self.cfg.train.grad_accum_steps}")
        for name, members in groups.items():
            params = [p for key in members if key in self.trained for p in self.trained[key].parameters()]
            if params:
                lr = o.disc_lr if name == "discriminator" else o.lr
                opts[name] = Updater(adamw(params, lr, o), params, o.grad_clip, accumulate=self.cfg.train.grad_accum_steps)
        return opts

    def _shard_generator(self) -> None:
        """train.parallel=fsdp: the generator, its EMA and the projector are sharded alike over all processes."""
        gen = self.m.generator
        if gen is None:
            return
        if self.env.is_main:
            self.sampling_generator = copy.deepcopy(self.emas["generator"].module)
        for mod in (gen, self.emas["generator"].module):
            sharding.shard(mod, mod.layers)
        if self.m.projector is not None:
            sharding.shard(self.m.projector)

    def _wrap_for_processes(self) -> Modules:
        """The modules the step functions call: DDP-wrapped where several processes train them (unless sharded)."""
        if not self.env.distributed:
            return self.m
        ids = [self.device.index] if self.device.type == "cuda" else None

        def wrap(mod: nn.Module) -> nn.Module:
            return mod if sharding.is_sharded(mod) else DDP(mod, device_ids=ids, broadcast_buffers=False)

        m = self.m
        return Modules(
            tokenizer=wrap(m.tokenizer) if "tokenizer" in self.trained else m.tokenizer,
            teacher=m.teacher,
            generator=wrap(m.generator) if m.generator is not None else None,
            projector=wrap(m.projector) if m.projector is not None else None,
            discriminator=m.discriminator,  # only used frozen (the GAN term of the tokenizer loss)
            discriminator_loss=wrap(m.discriminator_loss) if m.discriminator_loss is not None else None,
            perceptual=m.perceptual,
        )

    def step_config(self) -> StepConfig:
        gen = self.m.generator
        t = self.cfg.train
        logs = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.steps  # the step the loop logs after
        return StepConfig.from_config(self.cfg, tap_layer=self.tap_layer, gan_active=self.step >= self.cfg.loss.gan_start,
                                      class_dropout=gen.config.class_dropout if gen is not None else 0.0,
                                      soft_statistics=logs)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> RunSummary:
        cfg, t = self.cfg, self.cfg.train
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        writer = self._writer()
        if self.code_store is not None:
            stream = (StepBatch(b, b.index) for b in  # stored codes: nothing is substituted
                      self.code_store.stream(t.batch_size, t.seed, self.step, self.env.rank, self.env.world_size))
        else:
            stream = batch_stream(self.dataset, t.batch_size, t.seed, self.step, self.env.rank, self.env.world_size,
                                  num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                                  end_step=t.steps)
        step_fn = ar_step_on_codes if self.code_store is not None else STEPS[self.stage]
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and self.env.is_main), dynamic_ncols=True,
                   desc=f"{self.stage}")
        start, last_metrics, stopped_by = time.time(), {}, ""
        window: dict[str, list[Tensor]] = {}
        for module in self.trained.values():
            module.train()
        accum = t.grad_accum_steps
        first_step = self.step
        try:
            with StopSignals() as signals:
                while self.step < t.steps:
                    try:
                        batch, requested = next(stream)
                    except RuntimeError:  # a SIGTERM sent to every process of the job ended the data workers too
                        if not signals.received:
                            raise
                        stopped_by = self._stop_between_steps(signals.received)
                        break
                    # Dropout randomness from (seed, step, rank) alone: resume is exact and ranks draw different masks.
                    torch.manual_seed((t.seed * 1_000_003 + self.step) * 1_009 + self.env.rank)
                    self._set_learning_rates()
                    step_cfg = self.step_config()
                    self.guard.snapshot(list(self.trained.values()))
                    batch_counts = torch.zeros_like(self.usage_counts)
                    step_metrics = []
                    condition = self.text(batch.caption) if self.text is not None else batch.label  # labels or captions
                    micro_batches = zip(*(x.chunk(accum) for x in (batch.image, condition, batch.index)))
                    for micro, (images, labels, index) in enumerate(micro_batches):
                        images = images.to(self.device, non_blocking=True)
                        labels = labels.to(self.device, non_blocking=True)
                        with self._no_sync(last=micro == accum - 1), self._autocast():
                            target = self.targets(images, index)
                            result = step_fn(self.wrapped, self.opts, step_cfg, images, labels, target)
                        batch_counts += torch.bincount(result.indices.flatten(), minlength=batch_counts.numel())
                        step_metrics.append(result.metrics)
                    replaced = substitutions(requested, batch.index)
                    verdict = self.guard.check(step_metrics, bool(signals.received), len(replaced), self.device)
                    if verdict.bad_samples:
                        self.bad_data.record(self.step + 1, replaced)
                    if verdict.skip:
                        self._skip(verdict)
                    else:
                        self._commit(batch_counts, step_metrics, window)
                    self.step += 1
                    bar.update(1)
                    if self.step % t.log_every == 0 or self.step == t.steps:
                        last_metrics = self._log(writer, window, batch_counts)
                        window = {}
                        bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in last_metrics.items() if k.endswith("loss")})
                    if verdict.stop or self.step % t.checkpoint_every == 0 or self.step == t.steps:
                        self.save()  # first: a failing sample grid must not cost the checkpoint
                    if verdict.stop:
                        stopped_by = signals.received or "a stop signal to another process"
                        break
                    if self.step % t.sample_every == 0 or self.step == t.steps:
                        previews.write_grids(self)
                    if cfg.eval.fid_every and self.step % cfg.eval.fid_every == 0 and self.m.generator is not None:
                        previews.small_fid(self, writer)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        summary = RunSummary(self.run_dir, self.step, last_metrics, last_metrics.get("codebook/usage_window", float("nan")),
                             time.time() - start, stopped_by)
        if self.env.is_main and self.step > first_step:
            (self.run_dir / "summary.json").write_text(json.dumps(
                {"stage": self.stage, "step": summary.step, "seconds": round(summary.seconds, 1),
                 "skipped_steps": self.guard.skipped, "skipped_samples": self.bad_data.count, **summary.metrics}, indent=2))
        return summary

    def _stop_between_steps(self, signal_name: str) -> str:
        """The data loader died with the signal before this step: one process saves its state (that of the end of
        the last step); several cannot agree on it, as the others may be inside the step."""
        if self.env.distributed:
            raise RunStopped(f"step {self.step + 1}: {signal_name} also ended the data loader workers while this process "
                             f"waited for data; the last checkpoint (step {self.saved_step}) stays: `gear resume {self.run_dir}`")
        if self.saved_step != self.step:
            self.save()
        return signal_name

    def _commit(self, batch_counts: Tensor, step_metrics: list[dict[str, Tensor]], window: dict[str, list[Tensor]]) -> None:
        """A finite iteration: the optimizers step, then the EMAs; its metrics join the logging window."""
        apply_all(self.opts)
        self.guard.passed()
        self.usage_counts += batch_counts
        for name, ema in self.emas.items():
            ema.update(self.trained[name])
        for metrics in step_metrics:
            for k, v in metrics.items():
                window.setdefault(k, []).append(v.float())

    def _skip(self, verdict: Verdict) -> None:
        """A non-finite iteration: gradients dropped, buffers restored; too many in a row stop the run."""
        for updater in self.opts.values():
            updater.discard()
        self.guard.skip()
        step, g = self.step + 1, self.guard
        what = f"{verdict.bad_term} is {verdict.bad_value}" if verdict.bad_term else "a loss of another process is not finite"
        if g.exhausted:
            barrier()
            last = f"its last checkpoint (step {self.saved_step}) is" if self.saved_step is not None else "no checkpoint was"
            raise Diverged(f"step {step}: {what}, {g.in_a_row} steps in a row (train.max_bad_steps={g.max_bad_steps}); "
                           f"the run stopped and {last} written from finite weights: lower optim.lr or check the data, "
                           f"then continue with `gear resume {self.run_dir}`")
        if self.env.is_main:
            tqdm.write(f"step {step}: {what}: update skipped ({g.in_a_row} in a row, {g.skipped} in all; the run stops "
                       f"after train.max_bad_steps={g.max_bad_steps} in a row)", file=sys.stderr)

    def _set_learning_rates(self) -> None:
        """Linear warm-up over optim.warmup_steps, then constant (a function of the step: nothing to checkpoint)."""
        o = self.cfg.optim
        scale = min(1.0, (self.step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
        for name, updater in self.opts.items():
            for group in updater.optimizer.param_groups:
                group["lr"] = (o.disc_lr if name == "discriminator" else o.lr) * scale

    def _no_sync(self, last: bool):
        """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on every micro-batch but the last of a step."""
        stack = contextlib.ExitStack()
        if not last:
            for mod in vars(self.wrapped).values():
                if isinstance(mod, DDP):
                    stack.enter_context(mod.no_sync())
                elif sharding.is_sharded(mod):
                    stack.enter_context(sharding.no_gradient_sync(mod))
        return stack

    def _autocast(self):
        p = self.cfg.train.precision
        bf16 = p == "bf16" or (p == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    # ------------------------------------------------------------------ logging and artefacts

    def _writer(self):
        if not self.env.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tb"))

    def _log(self, writer, window: dict[str, list[Tensor]], batch_counts: Tensor) -> dict[str, float]:
        batch_counts = all_reduce_sum(batch_counts.clone())
        window_counts = all_reduce_sum(self.usage_counts.clone())
        self.usage_counts.zero_()
        metrics = {k: all_reduce_mean(torch.stack(v).mean()).item() for k, v in window.items()}
        metrics["codebook/usage_batch"] = (batch_counts > 0).float().mean().item()
        metrics["codebook/usage_window"] = (window_counts > 0).float().mean().item()
        p = window_counts.float() / window_counts.sum().clamp_min(1)
        metrics["codebook/perplexity"] = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
        metrics["train/skipped_steps"] = float(self.guard.skipped)
        metrics["data/skipped_samples"] = float(self.bad_data.count)
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(k, v, self.step)
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        return metrics

    def ema_generator(self) -> nn.Module | None:
        """The EMA generator as one plain module on rank 0 (None elsewhere). Under FSDP this gathers the shards
        into ``sampling_generator``, so every rank must call it."""
        if self.m.generator is None:
            return None
        ema = self.emas["generator"].module
        if not sharding.is_sharded(ema):
            return ema
        state = sharding.gather(ema.state_dict(), keep=self.env.is_main)
        if not self.env.is_main:
            return None
        self.sampling_generator.load_state_dict(state)
        return self.sampling_generator

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """Checkpoint for resume, plus safetensors model directories for sampling (written by rank 0).

        Under FSDP the shards are gathered first (every rank takes part); the checkpoint holds full tensors.
        Nothing non-finite is ever written, and a failed write stops every process with the old checkpoint intact."""
        keep = self.env.is_main
        payload = {
            "step": self.step,
            "stage": self.stage,
            "modules": {k: sharding.gather(v.state_dict(), keep) for k, v in self.trained.items()},
            "optimizers": {k: sharding.gather(u.optimizer.state_dict(), keep) for k, u in self.opts.items()},
            "emas": {k: sharding.gather(e.state_dict(), keep) for k, e in self.emas.items()},
            "guard": {**self.guard.state_dict(), "skipped_samples": self.bad_data.count},
            "data": stream_state(self.dataset),  # where each shard reader is (collective; {} for other data)
        }
        failure: RunStopped | None = None
        if keep:
            try:
                bad = first_non_finite_tensor(payload)
                if bad:
                    raise RunStopped(f"step {self.step}: {bad} holds NaN or inf, so no checkpoint was written; "
                                     f"the last one (step {self.saved_step}) stays")
                ckpt.save_run_checkpoint(self.run_dir, self.step, payload, self.cfg.train.keep_checkpoints)
                self._export_models(payload)
            except WriteError as err:
                failure = RunStopped(f"step {self.step}: {err}; the run stopped: make room (or fix the permissions), "
                                     f"then continue with `gear resume {self.run_dir}`")
            except RunStopped as err:
                failure = err
        if any_process(failure is not None, self.device):
            raise failure or RunStopped(f"step {self.step}: rank 0 could not write the checkpoint (see its error)")
        self.saved_step = self.step
        barrier()

    def _export_models(self, payload: dict) -> None:
        for kind, mod in (("tokenizer", self.m.tokenizer), ("generator", self.m.generator)):
            if mod is None:
                continue
            if sharding.is_sharded(mod):  # the gathered states, through rank 0's plain copy
                for state, name in ((payload["emas"][kind], kind), (payload["modules"][kind], f"{kind}{LIVE_SUFFIX}")):
                    self.sampling_generator.load_state_dict(state)
                    self.sampling_generator.save_pretrained(self.run_dir / name)
                continue
            ema = self.emas.get(kind)
            (ema.module if ema is not None else mod).save_pretrained(self.run_dir / kind)
            mod.save_pretrained(self.run_dir / f"{kind}{LIVE_SUFFIX}")

    def _load(self, payload: dict) -> None:
        if payload.get("stage") != self.stage:
            raise ValueError(f"the checkpoint is of stage {payload.get('stage')!r}, this config trains {self.stage!r}")
        if set(payload["modules"]) != set(self.trained):
            raise ValueError(f"the checkpoint trains {sorted(payload['modules'])} but this config trains "
                             f"{sorted(self.trained)}: resume with the run's own config.yaml")
        try:
            for k, mod in self.trained.items():
                sharding.load_module_state(mod, payload["modules"][k])
            for k, u in self.opts.items():
                sharding.load_optimizer_state(u.optimizer, payload["optimizers"][k])
            for k, e in self.emas.items():
                e.load_state_dict(payload["emas"][k])
            self.guard.load_state_dict(payload.get("guard", {}))
            self.bad_data.count = int(payload.get("guard", {}).get("skipped_samples", 0))
            restore_stream_state(self.dataset, payload.get("data"))
        except (RuntimeError, KeyError, ValueError) as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"the checkpoint does not match this config ({first}); resume with the run's own "
                             "config.yaml") from None
        self.step = self.saved_step = int(payload["step"])
