"""The training loop shared by all stages: ``Trainer.train_step`` is one iteration, ``Trainer.fit`` the loop
(get a batch, step, log, save, preview); the modules come from ``stage.py``, the grids from ``previews.py``."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gear.config import Config
from gear.data import build_dataset
from gear.data.bad_samples import substitutions
from gear.files import WriteError
from gear.models.autoencoder import Tokenizer
from gear.models.pretrained import ModelOrigin
from gear.run import LIVE_SUFFIX, TB_DIR, TOKENIZER_DIR, append_metrics, model_dir, write_run_config, write_summary
from gear.train import checkpoint as ckpt
from gear.train import previews, sharding
from gear.train.bad_data import BadSampleLog
from gear.train.batches import StepBatch, batch_stream, restore_stream_state, stream_state
from gear.train.build import FRESH, discriminator_start
from gear.train.code_store import CodeStore
from gear.train.distributed import DistEnv, any_process, barrier, setup_distributed
from gear.train.ema import EMA
from gear.train.guard import Diverged, RunStopped, StepGuard, Verdict, first_non_finite_tensor
from gear.train.preemption import StopSignals
from gear.train.stage import (autocast, build_modules, build_optimizers, micro_batch, set_learning_rates, tap_layer,
                              trained_modules, trains_discriminator, uses_bf16)
from gear.train.parallel import no_sync, shard_generator, wrap_for_processes
from gear.train.steps import STEPS, StepConfig, apply_all, ar_step_on_codes
from gear.train.targets import TeacherTargets
from gear.train.window import LogWindow
from gear.text.conditioner import TextConditioner


@dataclass
class RunSummary:
    run_dir: Path
    step: int
    metrics: dict[str, float]
    codebook_usage: float
    seconds: float
    stopped_by: str = ""     # the signal that stopped the run early (after writing its checkpoint)


class Trainer:
    """Builds everything a config asks for; ``fit()`` runs (or continues) the stage to ``train.steps``.

    The modules, in the views the trainer needs of them:
      ``m``         every module of the stage (``stage.build_modules``), as saved and exported
      ``trained``   the ones this stage updates, by name (checkpoint keys)
      ``wrapped``   what the step functions call: ``m`` with DDP wrappers when several processes train
      ``emas``      EMA copies of the trained tokenizer and generator (sharded like the generator under FSDP)
    ``sampling_models()`` gives the EMA pair as plain modules (under FSDP through ``plain_generator``, rank 0's
    unsharded copy), for the previews and the exported model directories.
    """

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
        # a resumed ar run keeps the frozen tokenizer it started with, not whatever model.tokenizer_init holds today
        tokenizer = Tokenizer.from_pretrained(model_dir(self.run_dir, TOKENIZER_DIR)) if resume and self.stage == "ar" else None
        # the discriminator starts from model.tokenizer_init's or model.discriminator_init's (a resumed run: its own)
        start = discriminator_start(cfg) if trains_discriminator(cfg) and not resume else None
        self.discriminator_source = start.source if start is not None else FRESH  # a resume reads its checkpoint's
        self.m = build_modules(cfg, self.num_classes, self.device, null=self.text.null if self.text is not None else None,
                               tokenizer=tokenizer, distributed=self.env.distributed,
                               discriminator=start.weights if start is not None else None)
        if start is not None and start.note and self.env.is_main:  # said once it fits
            print(start.note, file=sys.stderr)
        self.tap_layer = tap_layer(cfg, self.m.generator.config.n_layer) if self.m.generator is not None else 0
        self.grid = cfg.data.image_size // self.m.tokenizer.downsample
        self.code_store = (CodeStore(cfg.data.code_store, self.dataset, cfg.data, self.m.tokenizer, self.m.teacher,
                                     bf16=uses_bf16(cfg, self.device)) if cfg.data.code_store else None)
        self.step_fn = ar_step_on_codes if self.code_store is not None else STEPS[self.stage]
        self.trained = trained_modules(self.stage, self.m)
        self.emas = {name: EMA(mod, cfg.train.ema_decay) for name, mod in self.trained.items() if name in ("tokenizer", "generator")}
        self.plain_generator: nn.Module | None = None  # under FSDP: rank 0's unsharded copy for grids and exports
        if cfg.train.parallel == "fsdp" and self.env.distributed and self.m.generator is not None:
            self.plain_generator = shard_generator(self.m, self.emas["generator"].module, self.env.is_main)
        micro_batch(cfg, self.env.world_size)  # the batch splits over processes and accumulation steps
        self.opts = build_optimizers(cfg, self.trained)  # after sharding: FSDP replaces the parameters by DTensors
        self.wrapped = wrap_for_processes(self.m, self.trained, self.device) if self.env.distributed else self.m
        self.step = 0
        self.targets = TeacherTargets(self.m.teacher, self.grid, self.device, cache=cfg.train.cache_teacher_features,
                                      store=self.code_store)
        self.fid_classifier = None  # the reference classifier of the small FID, loaded on first use
        self.window = LogWindow(self.m.tokenizer.codebook_size, self.device)  # what the next log reports
        self.guard = StepGuard(cfg.train.max_bad_steps)
        self.bad_data = BadSampleLog(self.dataset, self.run_dir, self.env.is_main)
        self.saved_step: int | None = None  # the step of the latest checkpoint
        if resume:
            resumed = ckpt.load_for_resume(self.run_dir)
            if resumed.note and self.env.is_main:
                print(resumed.note, file=sys.stderr)
            self._load(resumed.payload)

    # ------------------------------------------------------------------ the loop

    def step_config(self) -> StepConfig:
        gen = self.m.generator
        t = self.cfg.train
        logs = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.steps  # the step the loop logs after
        return StepConfig.from_config(self.cfg, tap_layer=self.tap_layer, gan_active=self.step >= self.cfg.loss.gan_start,
                                      class_dropout=gen.config.class_dropout if gen is not None else 0.0,
                                      soft_statistics=logs)

    def fit(self) -> RunSummary:
        t = self.cfg.train
        self._write_config()
        writer = self._writer()
        stream = self._batches()
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and self.env.is_main), dynamic_ncols=True,
                   desc=f"{self.stage}")
        start, last_metrics, stopped_by = time.time(), {}, ""
        for module in self.trained.values():
            module.train()
        first_step = self.step
        try:
            with StopSignals() as signals:
                while self.step < t.steps:
                    try:
                        batch = next(stream)
                    except RuntimeError:  # a SIGTERM sent to every process of the job ended the data workers too
                        if not signals.received:
                            raise
                        stopped_by = self._stop_between_steps(signals.received)
                        break
                    verdict = self.train_step(batch, signals)
                    bar.update(1)
                    if self.step % t.log_every == 0 or self.step == t.steps:
                        last_metrics = self._log(writer)
                        bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in last_metrics.items() if k.endswith("loss")})
                    if verdict.stop or self.step % t.checkpoint_every == 0 or self.step == t.steps:
                        self.save()  # first: a failing sample grid must not cost the checkpoint
                    if verdict.stop:
                        stopped_by = signals.received or "a stop signal to another process"
                        break
                    if self.step % t.sample_every == 0 or self.step == t.steps:
                        self.preview()
                    if self.cfg.eval.fid_every and self.step % self.cfg.eval.fid_every == 0 and self.m.generator is not None:
                        self.small_fid(writer)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        summary = RunSummary(self.run_dir, self.step, last_metrics, last_metrics.get("codebook/usage_window", float("nan")),
                             time.time() - start, stopped_by)
        if self.step > first_step:
            self._write_summary(summary)
        return summary

    def _batches(self):
        """This process's share of every global batch from ``self.step`` on, as ``StepBatch``es."""
        t = self.cfg.train
        if self.code_store is not None:
            return (StepBatch(b, b.index) for b in  # stored codes: nothing is substituted
                    self.code_store.stream(t.batch_size, t.seed, self.step, self.env.rank, self.env.world_size))
        return batch_stream(self.dataset, t.batch_size, t.seed, self.step, self.env.rank, self.env.world_size,
                            num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                            end_step=t.steps)

    def train_step(self, batch: StepBatch, signals: StopSignals | None = None) -> Verdict:
        """One iteration on this process's share of a global batch: the stage's step on each micro-batch
        (train.grad_accum_steps), then the guard's verdict: the update is applied (EMAs follow) or, when a loss or
        gradient is not finite, skipped. ``signals``: the run's stop signals; one received by the end of the step
        (in any process) makes the verdict say stop.
        Advances ``self.step``."""
        t = self.cfg.train
        samples, requested = batch
        # Dropout randomness from (seed, step, rank) alone: resume is exact and ranks draw different masks.
        torch.manual_seed((t.seed * 1_000_003 + self.step) * 1_009 + self.env.rank)
        set_learning_rates(self.opts, self.cfg.optim, self.step)
        step_cfg = self.step_config()
        self.guard.snapshot(list(self.trained.values()))
        batch_counts = torch.zeros_like(self.window.usage)
        step_metrics = []
        condition = self.text(samples.caption) if self.text is not None else samples.label  # labels or captions
        accum = t.grad_accum_steps
        micro_batches = zip(*(x.chunk(accum) for x in (samples.image, condition, samples.index)))
        for micro, (images, labels, index) in enumerate(micro_batches):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with no_sync(self.wrapped, last=micro == accum - 1), autocast(self.cfg, self.device):
                target = self.targets(images, index)
                result = self.step_fn(self.wrapped, self.opts, step_cfg, images, labels, target)
            batch_counts += self.window.codes(result.indices)
            step_metrics.append(result.metrics)
        replaced = substitutions(requested, samples.index)
        stop = signals is not None and bool(signals.received)
        verdict = self.guard.check(step_metrics, stop, len(replaced), self.device)
        if verdict.bad_samples:
            self.bad_data.record(self.step + 1, replaced)
        if verdict.skip:
            self._skip(verdict)
        else:
            self._commit(batch_counts, step_metrics)
        self.window.last_batch = batch_counts
        self.step += 1
        return verdict

    def _stop_between_steps(self, signal_name: str) -> str:
        """The data loader died with the signal before this step: one process saves its state (that of the end of
        the last step); several cannot agree on it, as the others may be inside the step."""
        if self.env.distributed:
            raise RunStopped(f"step {self.step + 1}: {signal_name} also ended the data loader workers while this process "
                             f"waited for data; the last checkpoint (step {self.saved_step}) stays: `gear resume {self.run_dir}`")
        if self.saved_step != self.step:
            self.save()
        return signal_name

    def _commit(self, batch_counts: Tensor, step_metrics: list[dict[str, Tensor]]) -> None:
        """A finite iteration: the optimizers step, then the EMAs; its metrics join the logging window."""
        apply_all(self.opts)
        self.guard.passed()
        for name, ema in self.emas.items():
            ema.update(self.trained[name])
        self.window.add(batch_counts, step_metrics)

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

    # ------------------------------------------------------------------ logging and previews

    def _writer(self):
        if not self.env.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / TB_DIR))

    def _log(self, writer) -> dict[str, float]:
        """The metrics of the steps since the last log (every process takes part), written by rank 0."""
        metrics = self.window.close()
        metrics["train/skipped_steps"] = float(self.guard.skipped)
        metrics["data/skipped_samples"] = float(self.bad_data.count)
        self._write_metrics(writer, metrics)
        return metrics

    def sampling_models(self) -> tuple[nn.Module, nn.Module | None]:
        """The EMA tokenizer (the frozen one in the ar stage) and the EMA generator as plain modules on rank 0
        (a None generator elsewhere). Under FSDP this gathers the generator's shards, so every rank must call it."""
        tokenizer = self.emas["tokenizer"].module if "tokenizer" in self.emas else self.m.tokenizer
        if self.m.generator is None:
            return tokenizer, None
        ema = self.emas["generator"].module
        if not sharding.is_sharded(ema):
            return tokenizer, ema
        state = sharding.gather(ema.state_dict(), keep=self.env.is_main)
        if not self.env.is_main:
            return tokenizer, None
        self.plain_generator.load_state_dict(state)
        return tokenizer, self.plain_generator

    def preview(self) -> None:
        """Reconstruction and sample grids of this step under the run directory (written by rank 0)."""
        tokenizer, generator = self.sampling_models()
        if self.env.is_main:
            previews.write_grids(self.run_dir, self.step, tokenizer, generator, self.holdout, self.cfg,
                                 text=self.text, num_classes=self.num_classes, device=self.device)

    def small_fid(self, writer) -> dict[str, float]:
        """``previews.small_fid`` of the EMA models, logged as eval/* (rank 0; every rank takes part under FSDP)."""
        tokenizer, generator = self.sampling_models()
        if not self.env.is_main:
            return {}
        if self.fid_classifier is None:  # built (and its accuracy measured) once
            self.fid_classifier = previews.fid_classifier(self.cfg.data, self.device)
        logged = previews.small_fid(tokenizer, generator, self.cfg, self.fid_classifier)
        self._write_metrics(writer, logged)
        return logged

    # ------------------------------------------------------------------ the run directory's files (besides checkpoints)

    def _write_config(self) -> None:
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_run_config(self.run_dir, self.cfg)

    def _write_metrics(self, writer, metrics: dict[str, float]) -> None:
        """TensorBoard and one line of metrics.jsonl (rank 0, the one with a writer)."""
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(k, v, self.step)
            append_metrics(self.run_dir, self.step, metrics)

    def _write_summary(self, summary: RunSummary) -> None:
        if self.env.is_main:
            write_summary(self.run_dir, {"stage": self.stage, "step": summary.step, "seconds": round(summary.seconds, 1),
                                         "skipped_steps": self.guard.skipped, "skipped_samples": self.bad_data.count,
                                         **self._discriminator_summary(), **summary.metrics})

    def _discriminator_summary(self) -> dict[str, str]:
        """Where the discriminator started: "fresh", or the run directory or file its weights came from."""
        return {"discriminator": self.discriminator_source} if self.m.discriminator is not None else {}

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
        if self.discriminator_source != FRESH:  # absent: fresh (as in every checkpoint written before this key)
            payload["discriminator_init"] = self.discriminator_source
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
        config = dataclasses.asdict(self.cfg)
        for kind, mod in (("tokenizer", self.m.tokenizer), ("generator", self.m.generator)):
            if mod is None:
                continue
            ema = self.emas.get(kind)
            origins = {kind: ModelOrigin(self.stage, self.step, "EMA" if ema is not None else "frozen", config),
                       f"{kind}{LIVE_SUFFIX}": ModelOrigin(self.stage, self.step, "live" if ema is not None else "frozen",
                                                           config)}
            if sharding.is_sharded(mod):  # the gathered states, through rank 0's plain copy
                for state, name in ((payload["emas"][kind], kind), (payload["modules"][kind], f"{kind}{LIVE_SUFFIX}")):
                    self.plain_generator.load_state_dict(state)
                    self.plain_generator.save_pretrained(self.run_dir / name, origins[name])
                continue
            (ema.module if ema is not None else mod).save_pretrained(self.run_dir / kind, origins[kind])
            mod.save_pretrained(self.run_dir / f"{kind}{LIVE_SUFFIX}", origins[f"{kind}{LIVE_SUFFIX}"])

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
        if self.m.discriminator is not None:
            self.discriminator_source = str(payload.get("discriminator_init", FRESH))
            if self.discriminator_source != FRESH and self.env.is_main:  # not the source's again
                print(f"discriminator: the run's own, from its checkpoint (step {self.step}; it started from "
                      f"{self.discriminator_source})", file=sys.stderr)
