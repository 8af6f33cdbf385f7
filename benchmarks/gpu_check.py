"""One command for a GPU: step times, AR MFU, sampling speed, one FSDP step and the CUDA-marked tests.

    .venv/bin/python benchmarks/gpu_check.py                     # on one GPU (H200: about 5 minutes)
    .venv/bin/python benchmarks/gpu_check.py --tiny --device cpu --threads 1  # the same code on tiny sizes (a test runs it)

Sections (each timed, each can be skipped with --skip NAME):
  steps      the paper preset (GPT-B / VQ-16 / 256 px, projector 2048, batch 32, bf16 autocast): a frozen-tokenizer
             REPA step (LlamaGen-REPA), the GEAR joint step and its top-256 soft branch alone, eager and then with
             ``torch.compile`` (tokenizer, AR and discriminator compiled in place, as train.compile does);
             interleaved rounds, medians (benchmarks/step_cost.py's pieces)
  mfu        the AR step's counted FLOPs / time, against the GPU's dense bf16 peak and a measured bf16 matmul
  sampling   generate() at GPT-B, 16 x 16 tokens, CFG 1.5, batch 1 / 8 / 64: tokens/s with every decode step
             replayed from one CUDA graph and eagerly, and whether both drew the same tokens
  fsdp       one GEAR joint step in one process with the AR and projector under FSDP2 (world size 1)
  tests      pytest -m cuda (the CUDA-marked tests)
The report goes to benchmarks/results/gpu_check.md (``--out``), with the command and the time of each section.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost  # noqa: E402  (the benchmark next to this one)

ROOT = Path(__file__).resolve().parent.parent
DENSE_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # FLOP/s without sparsity, by device name

TINY = step_cost.BenchPreset(
    overrides=("model.tokenizer=vq-tiny", "model.generator=gpt-tiny", "data.image_size=32", "align.projector_dim=64",
               "loss.perceptual_weight=0"),
    num_classes=10, batch=2, sample_batch=2, teacher_dim=24, top_k=(16,), why="tiny sizes: a check that the script runs")
SECTIONS = ("steps", "mfu", "sampling", "fsdp", "tests")


def bench_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(device=args.device, seed=0, batch=0, set=["train.precision=bf16"] if args.device == "cuda" else [],
                              compile=False)


def build(args: argparse.Namespace, preset, compiled: bool = False) -> step_cost.Bench:
    """step_cost's modules; ``compiled`` compiles tokenizer, AR and discriminator in place as train.compile does
    (inductor on CUDA; on a CPU dynamo's tracing alone, backend "eager", so the tiny check needs no C++ build)."""
    b = step_cost.build(bench_args(args), preset)
    if compiled:
        for mod in (b.m.tokenizer, b.m.generator, b.m.discriminator):
            mod.compile(backend="inductor" if args.device == "cuda" else "eager")
    return b


def step_pieces(b: step_cost.Bench, k: int) -> dict:
    pieces = step_cost.make_pieces(b, (k,), marginal=False)
    return {name: pieces[name] for name in ("frozen", f"joint top-{k}", f"soft top-{k}")}


def check_steps(args, preset, lines: list[str]) -> None:
    lines += ["## Step times", "", "| piece | eager ms | compiled ms | compiled / eager |", "|---|---:|---:|---:|"]
    k = preset.top_k[0]
    med = {}
    for compiled in (False, True):
        b = build(args, preset, compiled)
        t0 = time.perf_counter()
        times = step_cost.interleaved(step_pieces(b, k), args.rounds, b.device)
        med[compiled] = {name: statistics.median(v) for name, v in times.items()}
        print(f"steps ({'compiled' if compiled else 'eager'}): "
              + ", ".join(f"{n} {1000 * v:.1f} ms" for n, v in med[compiled].items())
              + f" ({time.perf_counter() - t0:.0f} s with warm-up)", flush=True)
    for name, eager in med[False].items():
        comp = med[True][name]
        lines.append(f"| {name} | {1000 * eager:.1f} | {1000 * comp:.1f} | {comp / eager:.2f} |")
    lines += ["", f"Soft branch / frozen step: eager {med[False][f'soft top-{k}'] / med[False]['frozen']:.3f}, "
              f"compiled {med[True][f'soft top-{k}'] / med[True]['frozen']:.3f}; joint / frozen: eager "
              f"{med[False][f'joint top-{k}'] / med[False]['frozen']:.2f}, compiled "
              f"{med[True][f'joint top-{k}'] / med[True]['frozen']:.2f}.", ""]


def check_mfu(args, preset, lines: list[str]) -> None:
    b = build(args, preset)
    frozen = step_pieces(b, preset.top_k[0])["frozen"]
    flops = step_cost.count_flops(frozen)
    seconds = statistics.median(step_cost.interleaved({"frozen": frozen}, args.rounds, b.device)["frozen"])
    dtype = torch.bfloat16 if b.device.type == "cuda" else torch.float32
    measured = step_cost.matmul_peak(b.device, dtype, 8192 if b.device.type == "cuda" else 512)
    name = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else "cpu"
    spec = next((v for key, v in DENSE_BF16_PEAK.items() if key in name), None)
    rate = flops / seconds
    print(f"mfu: {rate / 1e9:.1f} GFLOP/s, {rate / measured:.1%} of the measured matmul", flush=True)
    lines += ["## AR step MFU", "",
              f"Frozen-tokenizer AR step (tokenizer encode included): {flops / 1e9:.1f} GFLOP in {1000 * seconds:.1f} ms = "
              f"{rate / 1e9:.1f} GFLOP/s; {rate / measured:.1%} of a measured {str(dtype).removeprefix('torch.')} "
              f"matmul ({measured / 1e9:.0f} GFLOP/s)"
              + (f"; MFU {rate / spec:.1%} of the {name} dense bf16 peak ({spec / 1e12:.0f} TFLOP/s)" if spec else ""),
              ""]


def check_sampling(args, lines: list[str]) -> None:
    from gear.models.gpt import build_generator
    from gear.models.sampling import generate

    device = torch.device(args.device)
    torch.manual_seed(0)
    gen = build_generator("gpt-tiny" if args.tiny else "gpt-b").to(device).eval()
    with torch.no_grad():
        torch.nn.init.normal_(gen.output.weight, std=0.02)
    modes = {"cuda graph": True, "eager": False} if device.type == "cuda" else {"eager": False}
    lines += ["## Sampling (CFG 1.5, bf16 autocast on CUDA)", "",
              f"{'gpt-tiny' if args.tiny else 'gpt-b'}, {gen.config.seq_len} tokens per image; tokens/s of images "
              "(CFG runs twice as many rows)", "",
              "| batch | " + " | ".join(modes) + " | same tokens |", "|---:|" + "---:|" * len(modes) + "---|"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for batch in (1, 2) if args.tiny else (1, 8, 64):
        labels = torch.arange(batch, device=device) % gen.config.num_classes
        rates, tokens = {}, {}
        for name, graph in modes.items():
            with autocast:
                generate(gen, labels, cfg_scale=1.5, seed=0, cuda_graph=graph)  # warm-up (and capture)
                step_cost.sync(device)
                t0 = time.perf_counter()
                tokens[name] = generate(gen, labels, cfg_scale=1.5, seed=0, cuda_graph=graph)
                step_cost.sync(device)
            rates[name] = batch * gen.config.seq_len / (time.perf_counter() - t0)
        same = all(torch.equal(t, next(iter(tokens.values()))) for t in tokens.values())
        print(f"sampling batch {batch}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in rates.items()), flush=True)
        lines.append(f"| {batch} | " + " | ".join(f"{rates[k]:.0f}" for k in modes) + f" | {same} |")
    lines.append("")


def check_fsdp(args, preset, lines: list[str]) -> None:
    import torch.distributed as dist

    from gear.train import sharding, stage, steps

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        b = build(args, preset)
        sharding.shard(b.m.generator, b.m.generator.layers)
        sharding.shard(b.m.projector)
        # after sharding, as the trainer builds them: FSDP replaced the parameters by DTensors
        b.opts["generator"] = stage.build_optimizers(b.cfg, {"generator": b.m.generator, "projector": b.m.projector})["generator"]
        times = []
        for _ in range(2):  # the first call gathers and allocates
            t0 = time.perf_counter()
            with b.autocast():
                result = steps.gear_step(b.m, b.opts, b.step_cfg, b.images, b.labels, b.target)
                steps.apply_all(b.opts)
            step_cost.sync(b.device)
            times.append(time.perf_counter() - t0)
        finite = all(bool(torch.isfinite(v).all()) for v in result.metrics.values())
    finally:
        dist.destroy_process_group()
    print(f"fsdp: joint step {1000 * times[-1]:.1f} ms, metrics finite: {finite}", flush=True)
    lines += ["## FSDP2 (one process)", "",
              f"One GEAR joint step with the AR and projector sharded by `fully_shard` (world size 1): "
              f"{1000 * times[-1]:.1f} ms after a first call of {1000 * times[0]:.1f} ms; all metrics finite: {finite}", ""]


def check_tests(args, lines: list[str]) -> None:
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests")],
                         capture_output=True, text=True, cwd=ROOT)
    summary = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"tests: {summary}", flush=True)
    lines += ["## CUDA-marked tests", "", f"`pytest -m cuda tests/`: {summary} (exit code {run.returncode})", ""]
    if run.returncode not in (0, 5):  # 5: nothing collected
        lines += ["```", run.stdout[-3000:], "```", ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny models and batches: a quick check that everything runs")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.md"), help="'' = do not write")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device (use --tiny --device cpu for a dry check)")
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = TINY if args.tiny else step_cost.PRESETS["paper"]
    machine = step_cost.machine(torch.device(args.device))
    lines = ["# GPU check", "",
             f"- command: `python benchmarks/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {machine}",
             f"- config: {preset.why}", ""]
    start = time.perf_counter()
    for section in SECTIONS:
        if section in args.skip:
            continue
        t0 = time.perf_counter()
        if section == "steps":
            check_steps(args, preset, lines)
        elif section == "mfu":
            check_mfu(args, preset, lines)
        elif section == "sampling":
            check_sampling(args, lines)
        elif section == "fsdp":
            check_fsdp(args, preset, lines)
        else:
            check_tests(args, lines)
        lines.insert(-1, f"({section}: {time.perf_counter() - t0:.0f} s)")
    lines.append(f"Total: {time.perf_counter() - start:.0f} s")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
