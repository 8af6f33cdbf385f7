"""The `gear` command: presets | train | resume | sample | reconstruct | eval gen | eval recon | convert."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _count_on_meta(build, name: str) -> int:
    with torch.device("meta"):
        model = build(name)
    return sum(p.numel() for p in model.parameters())


def cmd_presets(args: argparse.Namespace) -> None:
    from gear.models.autoencoder import TOKENIZER_PRESETS, build_tokenizer
    from gear.models.gpt import GPT_PRESETS, build_generator

    print("tokenizers (preset: quantizer, backbone, codebook, downsample, parameters)")
    for name, c in TOKENIZER_PRESETS.items():
        n = _count_on_meta(build_tokenizer, name)
        down = 2 ** (len(c.channel_mult) - 1)
        print(f"  {name:<10} {c.quantizer:<4} {c.backbone:<8} {c.codebook_size:>6} x {c.codebook_dim:<4} /{down:<3} "
              f"{n / 1e6:8.2f}M  ({n:,})")
    print("generators (preset: layers, heads, dim, parameters at the preset's vocabulary/grid/classes)")
    for name, c in GPT_PRESETS.items():
        n = _count_on_meta(build_generator, name)
        print(f"  {name:<10} {c.n_layer:>3} {c.n_head:>3} {c.dim:>5}   vocab {c.vocab_size:>5}  grid {c.grid_size:>2}  "
              f"classes {c.num_classes:>4}  {n / 1e6:8.2f}M")


def cmd_train(args: argparse.Namespace) -> None:
    from gear.config import load_config
    from gear.train.loop import Trainer

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from gear.train.dryrun import dry_run

        print(dry_run(cfg))
        return
    summary = Trainer(cfg, resume=args.resume).fit()
    _print_summary(summary)


def cmd_extract(args: argparse.Namespace) -> None:
    from gear.config import load_config
    from gear.train.code_store import extract_for_config

    done = extract_for_config(load_config(args.config, args.overrides), batch_size=args.batch_size)
    for path in (done.codes, done.features):
        if path is not None:
            print(f"{path}: {'written' if path.name in done.wrote else 'already there'}")
    print(f"{done.seconds:.1f} s")


def cmd_resume(args: argparse.Namespace) -> None:
    from gear.config import load_config
    from gear.train.loop import Trainer

    import dataclasses

    config = Path(args.run_dir) / "config.yaml"
    cfg = load_config(config, args.overrides)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(args.run_dir)))
    _print_summary(Trainer(cfg, resume=True).fit())


def _print_summary(summary) -> None:
    if summary is None:
        return
    keys = [k for k in summary.metrics if k.endswith("loss") or k.startswith("codebook/")]
    print(f"{summary.run_dir}: step {summary.step} in {summary.seconds:.0f} s; "
          + ", ".join(f"{k}={summary.metrics[k]:.4g}" for k in keys))


def cmd_sample(args: argparse.Namespace) -> None:
    import gear
    from gear.data.transforms import save_image_grid
    from gear.train.build import check_pair

    tok = gear.load_tokenizer(args.run_dir, ema=not args.live, map_location=args.device)
    gen = gear.load_generator(args.run_dir, ema=not args.live, map_location=args.device)
    check_pair(tok, gen)
    classes = [int(c) for c in args.classes.split(",")] if args.classes else list(range(min(10, gen.config.num_classes)))
    bad = [c for c in classes if not 0 <= c < gen.config.num_classes]
    if bad:
        raise SystemExit(f"gear sample: classes {bad} are outside 0..{gen.config.num_classes - 1}")
    labels = torch.tensor(classes, device=args.device).repeat_interleave(args.per_class)
    indices = gen.generate(labels, cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed)
    with torch.no_grad():
        images = tok.decode(indices)
    save_image_grid(images.float().cpu(), args.out, nrow=args.per_class)
    print(f"wrote {args.out}: {len(classes)} classes x {args.per_class} samples, cfg {args.cfg_scale}")


def cmd_reconstruct(args: argparse.Namespace) -> None:
    import gear
    from gear.data.image_folder import load_rgb
    from gear.data.transforms import center_crop, resize_short_side, save_image_grid, to_tensor_minus1_1
    import numpy as np

    tok = gear.load_tokenizer(args.run_dir, ema=not args.live, map_location=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = args.size or _run_image_size(args.run_dir)
    for path in args.images:
        pil = resize_short_side(load_rgb(Path(path)), size)
        image = to_tensor_minus1_1(center_crop(np.asarray(pil), size)).unsqueeze(0).to(args.device)
        with torch.no_grad():
            recon = tok.decode(tok.encode(image))
        target = out / (Path(path).stem + "_recon.png")
        save_image_grid(torch.cat([image, recon]).float().cpu(), target, nrow=2)
        print(f"wrote {target} (original | reconstruction)")


def _run_image_size(run_dir: str) -> int:
    from gear.config import load_config

    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        raise SystemExit(f"gear reconstruct: {config} not found; pass --size")
    return load_config(config).data.image_size


def cmd_eval(args: argparse.Namespace) -> None:
    from gear.eval import runs

    data = runs.run_data_config(args.run_dir)
    cache = Path(args.cache_dir) if args.cache_dir else None
    tok, gen = runs.load_pair(args.run_dir, ema=not args.live, device=args.device)
    classifier = None
    if args.feature == "classifier" or (args.what == "gen" and data.name == "fashion-mnist"):
        classifier = runs.reference_classifier(data, cache, device=args.device)
    if args.what == "gen":
        if gen is None:
            raise FileNotFoundError(f"{args.run_dir} holds no generator: evaluate a joint or ar run")
        metrics = runs.generation_metrics(tok, gen, data, num=args.num, cfg_scale=args.cfg_scale, feature=args.feature,
                                          batch_size=args.batch_size, seed=args.seed, classifier=classifier,
                                          cache_dir=cache, npz=args.npz, progress=True)
    else:
        metrics = runs.reconstruction_metrics(tok, data, num=args.num, feature=args.feature, batch_size=args.batch_size,
                                              classifier=classifier, progress=True)
    print(runs.write_json({"run": str(args.run_dir), "what": args.what, **metrics}, args.out))


def cmd_convert(args: argparse.Namespace) -> None:
    from gear.models.autoencoder import TOKENIZER_PRESETS, TokenizerConfig
    from gear.models.gpt import GPT_PRESETS, GPTConfig
    from gear.models.pretrained import CONFIG_NAME
    from gear.models.released import RELEASED_SUFFIXES, is_released_file, released_generator, released_tokenizer

    if args.preset in TOKENIZER_PRESETS:
        load, config_class = released_tokenizer, TokenizerConfig
    elif args.preset in GPT_PRESETS:
        load, config_class = released_generator, GPTConfig
    else:
        raise ValueError(f"unknown preset {args.preset!r}; valid presets: {sorted(TOKENIZER_PRESETS) + sorted(GPT_PRESETS)}")
    if not is_released_file(args.src):
        raise ValueError(f"{args.src} is not a checkpoint file ({', '.join(RELEASED_SUFFIXES)})")
    out = Path(args.out)
    if (out / CONFIG_NAME).exists():
        raise ValueError(f"{out} already holds a saved model; pass another --out or remove it first")
    model, weights = load(args.src, args.preset, ema=not args.live, **_config_overrides(args.overrides, config_class))
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {model.kind} {args.preset} ({n:,} parameters) from {args.src}: {weights.describe()}")


def _config_overrides(items: list[str], config_class: type) -> dict:
    """``key=value`` strings -> typed fields of ``config_class`` (values are YAML: channel_mult=[1,2,2])."""
    import typing

    import yaml

    from gear.config import _coerce

    hints = typing.get_type_hints(config_class)
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"{item!r} is not a {config_class.__name__} key=value; valid keys: {sorted(hints)}")
        out[key] = _coerce(yaml.safe_load(raw), hints[key], key)
    return out


def build_parser() -> argparse.ArgumentParser:
    from gear.config import EvalConfig

    cfg_scale = EvalConfig().cfg_scale
    p = argparse.ArgumentParser(prog="gear", description="GEAR: joint VQ tokenizer + autoregressive generator training")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("presets", help="list tokenizer and generator presets with parameter counts")
    s.set_defaults(func=cmd_presets)

    s = sub.add_parser("train", help="train one stage from a YAML config")
    s.add_argument("config", help="YAML file (see configs/)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 align.temperature=0.05")
    s.add_argument("--resume", action="store_true", help="continue from the checkpoint in train.out_dir")
    s.add_argument("--dry-run", action="store_true", help="build the models on the meta device, print sizes, exit")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("extract", help="encode the training images once for an ar config (data.code_store=DIR): "
                       "its codes under the frozen tokenizer and the teacher's features")
    s.add_argument("config", help="the YAML config of the ar stage")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.code_store=runs/codes")
    s.add_argument("--batch-size", type=int, default=256, help="images per encoding batch")
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("resume", help="continue a run from its directory (its config.yaml and checkpoint)")
    s.add_argument("run_dir")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=2000 to extend")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser("sample", help="class-conditional sample grid from a run directory")
    s.add_argument("run_dir")
    s.add_argument("--classes", default="", help="comma-separated class ids (default: the first up to 10)")
    s.add_argument("--per-class", type=int, default=8)
    s.add_argument("--cfg-scale", type=float, default=cfg_scale)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--live", action="store_true", help="use the live weights instead of the EMA")
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", default="samples.png")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("reconstruct", help="encode and decode images with a run's tokenizer")
    s.add_argument("run_dir")
    s.add_argument("images", nargs="+")
    s.add_argument("--out", default="reconstructions")
    s.add_argument("--size", type=int, default=0, help="image size (default: the run's data.image_size)")
    s.add_argument("--live", action="store_true")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_reconstruct)

    s = sub.add_parser("eval", help="metrics of a run: gen (FID, precision/recall, class accuracy) or recon (rFID, PSNR, SSIM)")
    s.add_argument("what", choices=["gen", "recon"])
    s.add_argument("run_dir")
    s.add_argument("--num", type=int, default=1000, help="samples / held-out images (Inception: ~4 images/s on 2 CPU cores)")
    s.add_argument("--cfg-scale", type=float, default=cfg_scale)
    s.add_argument("--feature", choices=["inception", "classifier"], default="inception",
                   help="inception: the standard FID network; classifier: the Fashion-MNIST reference classifier (fast)")
    s.add_argument("--batch-size", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--npz", default=None, help="also write the samples as an ADM-evaluator .npz (uint8 NHWC, arr_0)")
    s.add_argument("--cache-dir", default=None, help="where reference statistics and the classifier are cached "
                   "(default $GEAR_CACHE or ~/.cache/gear)")
    s.add_argument("--live", action="store_true")
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", default=None, help="write the metrics JSON here too")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("convert", help="a released checkpoint file -> a model directory (config.json + model.safetensors)")
    s.add_argument("src", help="a .pt / .pth / .ckpt / .bin / .safetensors file (see README: released files)")
    s.add_argument("overrides", nargs="*", help="config overrides of the preset, e.g. grid_size=24 for a 384 px GPT")
    s.add_argument("--preset", required=True, help="the file's architecture (see `gear presets`)")
    s.add_argument("--out", required=True, help="directory to write; use RUN/tokenizer and RUN/generator for `gear sample RUN`")
    s.add_argument("--live", action="store_true", help="the live weights instead of the EMA copy the file may hold")
    s.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # key=value overrides may also follow a flag (`gear train CFG --dry-run train.parallel=fsdp`), which
    # argparse leaves unparsed once the positional list has been consumed
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from gear.config import ConfigError

    try:
        args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"gear {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
