"""What one GEAR iteration costs next to a frozen-tokenizer REPA step (LlamaGen-REPA), measured in one run.

Timed pieces, on the same modules, config and batch, interleaved over rounds (medians reported):
  frozen        ar_step: the AR update (NTP + REPA) on a frozen tokenizer (its encode included)
  joint X       gear_step: tokenizer, discriminator and AR updates, soft assignment X
  soft X        the soft branch alone: soft assignment from d, frozen AR up to the tap, projector, REPA, and the
                backward down to d (the encoder/codebook backward below d is shared with the quantizer's losses)
  tok X         (--marginal) tokenizer forward + update with the soft branch; ``tok X - tok plain`` (plain =
                lambda_tok 0) is the soft branch's marginal cost inside the real update: a noisier cross-check
where X is ``full`` (softmax over all K codes, soft_top_k = 0), ``top-k`` (the k nearest codes, k = 256 the default,
renormalized, fed to the AR as a sparse input) or ``top-k dense`` (the same assignment scattered back to
(B, L, K), to show what the sparse input saves).
Also: FLOPs of each piece (torch.utils.flop_counter), the AR step's achieved FLOP/s as a fraction of a large
matmul's measured peak, sampling throughput with and without the KV cache (CFG on), and the cosine between the
top-k and the full soft branch's gradients w.r.t. the tokenizer's encoder and codebook.

CPU (the default preset; ~5 minutes on 2 busy cores):
    .venv/bin/python benchmarks/step_cost.py --threads 1 [--marginal] [--cosine-tokenizer runs/demo/tokenizer]
GPU (GPT-B / VQ-16 / 256 px, bf16 autocast; --compile compiles tokenizer, AR and discriminator):
    .venv/bin/python benchmarks/step_cost.py --device cuda --preset paper [--compile]
``--build-only`` checks that a preset builds; ``--flops-only`` counts FLOPs without timing (device-independent).
Timings are never asserted anywhere: these machines are shared and noisy; only ratios measured within one run
mean something. On a CPU shared with other jobs, ``--threads 1`` gives steadier ratios (a multi-threaded op
waits for its slowest thread, and a descheduled thread stalls it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from gear.config import Config, load_config
from gear.models.autoencoder import TokenizerOutput
from gear.models.quantizers import QuantizerLosses
from gear.models.sampling import generate, sample_logits
from gear.train import stage, steps
from gear.train.steps import Modules, StepConfig, Updater, apply_all, ar_step, gear_step, tokenizer_terms, update_tokenizer


@dataclass(frozen=True)
class BenchPreset:
    """A benchmark configuration: config overrides plus what the config does not hold."""

    overrides: tuple[str, ...]
    num_classes: int
    batch: int
    sample_batch: int
    teacher_dim: int = 0          # 0 = run the config's teacher; else a fixed random target of this width
    top_k: tuple[int, ...] = (256, 64)     # the first is also timed in the joint step
    why: str = ""


PRESETS: dict[str, BenchPreset] = {
    "cpu": BenchPreset(
        overrides=(
            "model.tokenizer=vq-tiny", "model.tokenizer_overrides={codebook_size: 4096}",
            "model.generator=gpt-mini", "data.image_size=32", "align.projector_dim=512",
        ),
        num_classes=10, batch=32, sample_batch=8, top_k=(256, 64),
        why=(
            "32 px -> 8x8 tokens, gpt-mini (dim 256, 6 layers, tap 2 = n_layer // 3 like the paper's 4 of 12), "
            "a 4096 x 8 cosine codebook: K / dim = 16 (paper 16384 / 768 = 21), and the output layer is 22% of "
            "the AR's block parameters (paper 15%; K = 8192 would make it 44% and the AR step logit-bound). "
            "Projector hidden 512 keeps the projector at 9% of the AR blocks (paper: 2048 for GPT-B, 9%). "
            "Batch 32 of Fashion-MNIST; teacher EfficientNet-Lite0 (112-d, stride 16)."
        ),
    ),
    "paper": BenchPreset(
        overrides=(
            "model.tokenizer=vq-16", "model.generator=gpt-b", "data.image_size=256", "align.projector_dim=2048",
        ),
        num_classes=1000, batch=32, sample_batch=32, teacher_dim=768, top_k=(256, 64),
        why=(
            "the paper's GPT-B / VQ-16 (16384 x 8) / 256 px (16x16 tokens), projector 2048, tap 4; random images "
            "and a fixed random 768-d target stand in for ImageNet and DINOv2-B (timing does not depend on them)."
        ),
    ),
}


# ----------------------------------------------------------------------------------------- building


@dataclass
class Bench:
    cfg: Config
    m: Modules
    opts: dict[str, Updater]
    step_cfg: StepConfig
    images: Tensor
    labels: Tensor
    target: Tensor
    device: torch.device
    bf16: bool          # the steps run under bf16 autocast (train.precision, as the trainer decides it)

    def autocast(self):
        return stage.autocast(self.cfg, self.device)


def build(args: argparse.Namespace, preset: BenchPreset) -> Bench:
    """The joint stage's modules and optimizers, built by the trainer's own functions (``gear.train.stage``)."""
    device = torch.device(args.device)
    cfg = load_config(None, [*preset.overrides, "train.stage=joint", *(["train.compile=true"] if args.compile else []),
                             *args.set])
    torch.manual_seed(args.seed)
    # preset.teacher_dim: no teacher; a fixed random target of that width stands in for its features
    m = stage.build_modules(cfg, preset.num_classes, device, target_dim=preset.teacher_dim)
    if m.projector is None:
        raise ValueError("the benchmark times the soft branch: keep align.lambda_tok and align.lambda_ar > 0")
    batch = args.batch or preset.batch
    images, labels = benchmark_batch(cfg, preset, batch, device, args.seed)
    grid = cfg.data.image_size // m.tokenizer.downsample
    if preset.teacher_dim:
        g = torch.Generator().manual_seed(args.seed)
        target = torch.randn(batch, grid * grid, preset.teacher_dim, generator=g).to(device)
    else:
        with torch.no_grad():
            target = m.teacher(images, grid).float()
    trained = stage.trained_modules("joint", m)
    opts = stage.build_optimizers(cfg, trained)
    for mod in trained.values():
        mod.train()
    step_cfg = StepConfig.from_config(cfg, tap_layer=stage.tap_layer(cfg, m.generator.config.n_layer),
                                      class_dropout=m.generator.config.class_dropout,
                                      soft_statistics=False)  # a step the trainer does not log
    return Bench(cfg, m, opts, step_cfg, images, labels, target, device, stage.uses_bf16(cfg, device))


def benchmark_batch(cfg: Config, preset: BenchPreset, batch: int, device: torch.device, seed: int):
    """The config's first training images when they are on disk (Fashion-MNIST), else uniform noise."""
    if cfg.data.name == "fashion-mnist" and not preset.teacher_dim:
        try:
            from gear.data import build_dataset

            data = build_dataset(cfg.data, "train")
            samples = [data[i] for i in range(batch)]
            images = torch.stack([s.image for s in samples])
            labels = torch.tensor([int(s.label) for s in samples])
            return images.to(device), labels.to(device)
        except (FileNotFoundError, OSError):
            pass
    g = torch.Generator().manual_seed(seed)
    size = cfg.data.image_size
    images = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    return images.to(device), torch.randint(0, preset.num_classes, (batch,), generator=g).to(device)


# ----------------------------------------------------------------------------------------- pieces


def soft_branch_input(b: Bench) -> TokenizerOutput:
    """A tokenizer output whose d is a leaf and whose other terms are constants: the soft branch's own graph."""
    with torch.no_grad(), b.autocast():
        out = b.m.tokenizer(b.images)
    losses = QuantizerLosses(*(t.detach() for t in dataclasses.astuple(out.quant.losses)))
    quant = dataclasses.replace(out.quant, d=out.quant.d.detach().requires_grad_(), losses=losses)
    return TokenizerOutput(reconstruction=out.reconstruction.detach(), quant=quant)


def make_pieces(b: Bench, ks: tuple[int, ...], marginal: bool) -> dict[str, Callable[[], None]]:
    """Callables for every timed piece: the soft branch for full softmax and each k in ``ks``, the joint step
    for full and ks[0] (the default top-k), and with ``marginal`` the tokenizer update with and without
    the soft branch."""
    m, sc, images, labels, target = b.m, b.step_cfg, b.images, b.labels, b.target
    leaf = soft_branch_input(b)
    no_rec = dataclasses.replace(sc, l1_weight=0.0, perceptual_weight=0.0, gan_weight=0.0)
    plain = dataclasses.replace(sc, lambda_tok=0.0)

    def frozen():
        with b.autocast():
            ar_step(m, b.opts, sc, images, labels, target)
        b.opts["generator"].apply()

    def tok(cfg: StepConfig):
        def run():
            with b.autocast():
                update_tokenizer(m, b.opts["tokenizer"], cfg, images, labels, target, m.tokenizer(images))
            b.opts["tokenizer"].apply()
        return run

    def joint(cfg: StepConfig):
        def run():
            with b.autocast():
                gear_step(m, b.opts, cfg, images, labels, target)
            apply_all(b.opts)
        return run

    def soft(cfg: StepConfig, dense_top_k: bool = False):
        def run():
            leaf.quant.d.grad = None
            with b.autocast():
                if dense_top_k:  # the truncated assignment scattered back to (B, L, K)
                    terms = dense_soft_terms(m, cfg, leaf, labels, target)
                else:
                    terms = tokenizer_terms(m, cfg, images, labels, target, leaf)
            terms["align_tok"].backward()
        return run

    pieces = {"frozen": frozen}
    for k in (0, *ks[:1]):
        pieces[f"joint {variant(k)}"] = joint(dataclasses.replace(sc, soft_top_k=k))
    for k in (0, *ks):
        pieces[f"soft {variant(k)}"] = soft(dataclasses.replace(no_rec, soft_top_k=k))
    if ks:
        pieces[f"soft {variant(ks[0])} dense"] = soft(dataclasses.replace(no_rec, soft_top_k=ks[0]), dense_top_k=True)
    if marginal:
        pieces["tok plain"] = tok(plain)
        for k in (0, *ks[:1]):
            pieces[f"tok {variant(k)}"] = tok(dataclasses.replace(sc, soft_top_k=k))
    return pieces


def variant(k: int) -> str:
    return f"top-{k}" if k else "full"


def dense_soft_terms(m: Modules, cfg: StepConfig, out: TokenizerOutput, labels: Tensor, target: Tensor):
    """The soft branch with the top-k assignment as a dense (B, L, K) tensor (what the sparse input replaces)."""
    from gear.align.repa import repa_loss

    B = labels.shape[0]
    soft = steps.soft_tokens(out.quant.d, cfg.temperature, cfg.soft_top_k, B, sparse=False)
    with steps.frozen(m.generator, m.projector):
        ar = m.generator(soft[:, :-1], labels, tap_layer=cfg.tap_layer, stop_at_tap=True)
        return {"align_tok": cfg.lambda_tok * repa_loss(m.projector(ar.hidden), target)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(pieces: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each piece: one warm-up call each, then ``rounds`` rounds in a rotating order."""
    for fn in pieces.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in pieces}
    names = list(pieces)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            pieces[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _bag_flops(weight_shape, indices_shape, *args, **kwargs) -> int:
    """A weighted sum of k rows of width D per bag: 2 k D per bag (the counter has no formula of its own)."""
    return 2 * math.prod(indices_shape) * weight_shape[-1]


def _bag_weights_grad_flops(grad_shape, weight_shape, indices_shape, *args, **kwargs) -> int:
    return 2 * math.prod(indices_shape) * weight_shape[-1]


def count_flops(fn: Callable[[], None]) -> int:
    aten = torch.ops.aten
    custom = {aten._embedding_bag: _bag_flops, aten._embedding_bag_forward_only: _bag_flops,
              aten._embedding_bag_per_sample_weights_backward: _bag_weights_grad_flops}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul over a few repeats."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    w = torch.randn(n, n, device=device, dtype=dtype)
    a @ w
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ w
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------------------- sampling


@torch.inference_mode()
def generate_without_cache(model, labels: Tensor, cfg_scale: float, seed: int) -> Tensor:
    """The same sampler as ``generate`` but re-running the whole prefix at every step (no KV cache)."""
    gen = torch.Generator(device=labels.device).manual_seed(seed)
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)])
    B, L = labels.shape[0], model.config.seq_len
    tokens = torch.empty(B, L, dtype=torch.long, device=labels.device)
    modes = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        for t in range(L):
            prefix = tokens[:, :t]
            logits = model(torch.cat([prefix, prefix]), cond).logits[:, -1]
            c, u = logits.chunk(2)
            tokens[:, t] = sample_logits(u + cfg_scale * (c - u), generator=gen)
    finally:
        for mod, mode in modes:
            mod.training = mode
    return tokens


def sampling_throughput(b: Bench, batch: int, rounds: int, cfg_scale: float = 1.5) -> dict[str, float]:
    """Image tokens per second (CFG on: the model runs 2 x batch rows), medians over rounds."""
    gen = b.m.generator
    labels = b.labels[:batch]
    n_tokens = batch * gen.config.seq_len
    pieces = {
        "kv cache": lambda: generate(gen, labels, cfg_scale=cfg_scale, seed=0),
        "no cache": lambda: generate_without_cache(gen, labels, cfg_scale, seed=0),
    }

    def run(fn):
        def call():
            with b.autocast():
                fn()
        return call

    times = interleaved({k: run(f) for k, f in pieces.items()}, rounds, b.device)
    return {k: n_tokens / statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------------------------------- gradient agreement


def grad_cosines(b: Bench, m: Modules, temperatures: tuple[float, ...], ks: tuple[int, ...]) -> list[dict]:
    """cos(grad of the top-k soft branch, grad of the full soft branch) w.r.t. encoder and codebook parameters."""
    tok = m.tokenizer
    groups = {
        "encoder": [p for n, p in tok.named_parameters() if n.startswith(("encoder.", "quant_conv."))],
        "codebook": [p for n, p in tok.named_parameters() if n.startswith("quantize.")],
    }
    params = groups["encoder"] + groups["codebook"]
    sizes = [len(groups["encoder"]), len(groups["codebook"])]
    base = dataclasses.replace(b.step_cfg, l1_weight=0.0, perceptual_weight=0.0, gan_weight=0.0)
    rows = []
    with b.autocast():
        out = tok(b.images)
    for T in temperatures:
        def grads(k: int) -> list[Tensor]:
            cfg = dataclasses.replace(base, temperature=T, soft_top_k=k)
            with b.autocast():
                align = tokenizer_terms(m, cfg, b.images, b.labels, b.target, out)["align_tok"]
            g = torch.autograd.grad(align, params, retain_graph=True, allow_unused=True)
            return [torch.zeros_like(p) if x is None else x for p, x in zip(params, g)]

        full = grads(0)
        mass = soft_mass(out.quant.d.detach(), T, ks)
        for k in ks:
            top = grads(k)
            row = {"T": T, "k": k, "mass": mass[k]}
            for name, (lo, hi) in {"encoder": (0, sizes[0]), "codebook": (sizes[0], sum(sizes)),
                                   "all": (0, sum(sizes))}.items():
                # float64: deep encoders' gradients are small enough that a float32 |a| |c| loses precision
                a = torch.cat([g.flatten() for g in full[lo:hi]]).double()
                c = torch.cat([g.flatten() for g in top[lo:hi]]).double()
                row[name] = float(torch.dot(a, c) / (a.norm() * c.norm()))
            rows.append(row)
    return rows


def modules_with_tokenizer(b: Bench, path: str, num_classes: int) -> Modules:
    """A saved (trained) tokenizer with a fresh AR and projector of the benchmark's sizes."""
    from gear.models.autoencoder import Tokenizer
    from gear.run import TOKENIZER_DIR, model_dir

    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(model_dir(path, TOKENIZER_DIR))
    if b.cfg.data.image_size % tok.downsample or tok.config.image_channels != b.images.shape[1]:
        raise ValueError(f"{path}: its tokenizer does not fit {b.cfg.data.image_size} px RGB images")
    m = stage.build_modules(b.cfg, num_classes, b.device, tokenizer=tok, target_dim=b.target.shape[-1])
    return Modules(tokenizer=m.tokenizer.train(), generator=m.generator, projector=m.projector)


def soft_mass(d: Tensor, temperature: float, ks: tuple[int, ...]) -> dict[int, float]:
    """Mean share of the full softmax(-d / T) that the k nearest codes hold."""
    p = torch.softmax(-d.float() / temperature, dim=-1)
    top = p.topk(max(ks), dim=-1).values.cumsum(-1)
    return {k: float(top[:, k - 1].mean()) for k in ks}


# ----------------------------------------------------------------------------------------- report


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def report(args, preset: BenchPreset, b: Bench, times, flops, peak, sampling, cosines, elapsed: float) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    frozen = med["frozen"]
    g, t = b.m.generator.config, b.m.tokenizer.config
    lines = [
        "# Step cost: GEAR's joint step and its soft branch vs a frozen-tokenizer REPA step",
        "",
        f"- command: `{' '.join(['python', *sys.argv])}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {machine(b.device)}; "
        f"run time {elapsed:.0f} s",
        f"- config ({args.preset}): {t.quantizer} K={t.codebook_size} x {t.codebook_dim}, {b.cfg.data.image_size} px, "
        f"{g.grid_size}x{g.grid_size} tokens, AR dim {g.dim} x {g.n_layer} layers (tap {b.step_cfg.tap_layer}), "
        f"projector {b.cfg.align.projector_dim} -> {b.target.shape[-1]}, batch {b.images.shape[0]}, "
        f"T={b.step_cfg.temperature}, precision {'bf16' if b.bf16 else 'fp32'}"
        f"{', compiled' if args.compile else ''}",
        f"- why this config: {preset.why}",
        f"- timing: {args.rounds} interleaved rounds after one warm-up call each; medians; ratios are to `frozen`",
        "",
        "| piece | median ms | / frozen | GFLOP | FLOP / frozen |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in times:
        fl = flops.get(name)
        fl_cols = "| |" if fl is None else f"{fl / 1e9:.2f} | {fl / flops['frozen']:.3f} |"
        lines.append(f"| {name} | {1000 * med[name]:.1f} | {med[name] / frozen:.3f} | {fl_cols}")
    lines += [
        "",
        "`FLOP / frozen` of a sparse `soft top-k` is the floor of any soft branch at this config: the frozen AR up "
        "to the tap and the projector, forward plus input-gradient backward (top-k selection and the k-row "
        "embedding add almost no FLOPs). Its time ratio above that is the top-k selection over K, the sparse "
        "embedding and the blocks' elementwise work.",
    ]
    if "tok plain" in med:
        lines += ["", "Soft branch's marginal cost inside the tokenizer update (`tok X - tok plain`) / frozen:", ""]
        for name in times:
            if name.startswith("tok ") and name != "tok plain":
                lines.append(f"- {name[4:]}: {(med[name] - med['tok plain']) / frozen:.3f}")
    rate = flops["frozen"] / frozen
    lines += [
        "",
        f"AR training step (`frozen`, tokenizer encode included): {flops['frozen'] / 1e9:.2f} GFLOP in "
        f"{1000 * frozen:.1f} ms = {rate / 1e9:.1f} GFLOP/s = "
        + ", ".join(f"{rate / v:.1%} of the measured {what} peak ({v / 1e9:.0f} GFLOP/s)" for what, v in peak.items()),
        "",
        f"Sampling (CFG 1.5, batch {sampling['batch']}, {g.seq_len} tokens per image): "
        + ", ".join(f"{k} {v:.0f} tokens/s" for k, v in sampling["rates"].items())
        + f"; KV cache speed-up {sampling['rates']['kv cache'] / sampling['rates']['no cache']:.1f}x",
    ]
    for what, rows in cosines.items():
        lines += [
            "",
            f"Gradient cosine, top-k vs full soft branch (REPA term only), w.r.t. the tokenizer's encoder and codebook; "
            f"{what}; mass = mean share of the full softmax held by the k nearest codes:",
            "",
            "| T | k | mass | encoder | codebook | all |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {r['T']} | {r['k']} | {r['mass']:.3f} | {r['encoder']:.4f} | {r['codebook']:.4f} | "
                  f"{r['all']:.4f} |" for r in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- main


def flops_report(args, preset: BenchPreset, b: Bench, flops: dict[str, int]) -> str:
    batch = b.images.shape[0]
    lines = [
        f"# Step FLOPs at the `{args.preset}` preset (counted, not timed)",
        "",
        f"- command: `python benchmarks/step_cost.py {' '.join(sys.argv[1:])}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; batch {batch}",
        f"- config: {preset.why}",
        "- `frozen` is a frozen-tokenizer REPA step (LlamaGen-REPA); `soft` is GEAR's soft branch alone; `joint` the",
        "  whole GEAR step (tokenizer with perceptual and GAN terms, discriminator, AR).",
        "",
        "| piece | GFLOP per image | FLOP / frozen |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {fl / batch / 1e9:.2f} | {fl / flops['frozen']:.3f} |" for name, fl in flops.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=0, help="0 = the preset's")
    p.add_argument("--top-k", type=int, nargs="*", default=None, help="soft_top_k values to time (default: the preset's)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--marginal", action="store_true",
                   help="also time the tokenizer update with and without the soft branch (a noisy difference)")
    p.add_argument("--flops-only", action="store_true", help="count each piece's FLOPs once; time nothing")
    p.add_argument("--sample-rounds", type=int, default=3)
    p.add_argument("--grad-temperatures", type=float, nargs="*", default=[0.1, 0.05, 0.01])
    p.add_argument("--grad-k", type=int, nargs="*", default=None, help="k values for the gradient cosine table")
    p.add_argument("--cosine-tokenizer", default="",
                   help="also a saved tokenizer (run dir or model dir) for the cosine table, with a fresh AR")
    p.add_argument("--skip", nargs="*", default=[], choices=("timing", "sampling", "grad"))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--build-only", action="store_true", help="build the preset's modules and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_cost.md"), help="'' = do not write")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    start = time.perf_counter()
    b = build(args, preset)
    sizes = {k: sum(p.numel() for p in getattr(b.m, k).parameters()) / 1e6 for k in ("tokenizer", "generator", "projector")}
    print(f"built {args.preset}: " + ", ".join(f"{k} {v:.1f}M" for k, v in sizes.items()), flush=True)
    if args.build_only:
        return
    ks = tuple(args.top_k if args.top_k is not None else preset.top_k)
    if args.flops_only:
        pieces = make_pieces(b, ks, args.marginal)
        flops = {name: count_flops(fn) for name, fn in pieces.items()}
        for name, fl in flops.items():
            print(f"{name:>22}: {fl / 1e9:10.2f} GFLOP  ({fl / flops['frozen']:.3f} x frozen)", flush=True)
        if args.out:  # next to the timed report, never over it
            path = Path(args.out).with_name(f"step_cost_flops_{args.preset}.md")
            path.write_text(flops_report(args, preset, b, flops))
            print(f"wrote {path}")
        return
    cosines: dict[str, list[dict]] = {}
    if "grad" not in args.skip:  # first, on the untouched weights
        sets = {f"fresh benchmark tokenizer (K={b.m.tokenizer.codebook_size}) and AR": b.m}
        if args.cosine_tokenizer:
            extra = modules_with_tokenizer(b, args.cosine_tokenizer, preset.num_classes)
            sets[f"tokenizer {args.cosine_tokenizer} (K={extra.tokenizer.codebook_size}), fresh AR"] = extra
        for what, m in sets.items():
            K = m.tokenizer.codebook_size
            grad_k = tuple(sorted({k for k in (args.grad_k or (*ks, 8, 32, 128, 512, 2048)) if 0 < k < K}))
            cosines[what] = grad_cosines(b, m, tuple(args.grad_temperatures), grad_k)
            for r in cosines[what]:
                print(f"grad cos K={K} T={r['T']} k={r['k']}: all {r['all']:.4f} (mass {r['mass']:.3f})", flush=True)
    # fp32 always; bf16 too when the steps run under bf16 autocast (CUDA)
    peak_dtypes = [torch.float32] + ([torch.bfloat16] if b.bf16 else [])
    peak_n = 8192 if b.device.type == "cuda" else 2048
    peaks = {dt: matmul_peak(b.device, dt, peak_n) for dt in peak_dtypes}
    times, flops = {}, {}
    if "timing" not in args.skip:
        pieces = make_pieces(b, ks, args.marginal)
        flops = {name: count_flops(fn) for name, fn in pieces.items()}
        times = interleaved(pieces, args.rounds, b.device)
        frozen_s = statistics.median(times["frozen"])
        for name, v in times.items():
            print(f"{name:>22}: {median_ms(v):8.1f} ms  ({statistics.median(v) / frozen_s:.3f} x frozen)", flush=True)
    peaks = {dt: max(v, matmul_peak(b.device, dt, peak_n)) for dt, v in peaks.items()}  # before and after
    peak = {f"{str(dt).removeprefix('torch.')} {peak_n}^3 matmul": v for dt, v in peaks.items()}
    sampling = {"batch": min(preset.sample_batch, b.images.shape[0]), "rates": {}}
    if "sampling" not in args.skip:
        sampling["rates"] = sampling_throughput(b, sampling["batch"], args.sample_rounds)
        print("sampling: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in sampling["rates"].items()), flush=True)
    if not times or not sampling["rates"]:
        return  # a partial run prints but does not overwrite the report
    text = report(args, preset, b, times, flops, peak, sampling, cosines, time.perf_counter() - start)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
