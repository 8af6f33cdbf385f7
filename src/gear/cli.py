"""The `gear` command: presets | train | resume | extract | sample | edit | reconstruct | eval gen|recon|t2i|adm |
convert | export | serve.

Errors end in one line on stderr, `gear CMD: error: ...`: exit status 2 when the input is wrong (arguments,
config, files), 1 when the run failed on its own (it diverged, the disk is full); a run stopped by SIGTERM or
SIGINT exits 0 once its checkpoint is written.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `gear sample: error: argument --cfg-scale: must be >= 0, got -1.0`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def at_least(low: float, kind: type = int, strict: bool = False):
    """An argparse type: a number >= low (> low when ``strict``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value
    return parse


def class_ids(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class ids such as 0,3,7, got {text!r}") from None


def unit_interval(text: str) -> float:
    value = at_least(0.0, float, strict=True)(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


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
    _print_summary(summary, "train")


def cmd_extract(args: argparse.Namespace) -> None:
    from gear.config import load_config
    from gear.train.code_store import extract_for_config

    done = extract_for_config(load_config(args.config, args.overrides), batch_size=args.batch_size)
    for path in (done.codes, done.features):
        if path is not None:
            print(f"{path}: {'written' if path.name in done.wrote else 'already there'}")
    print(f"{done.seconds:.1f} s")


def cmd_resume(args: argparse.Namespace) -> None:
    import dataclasses

    from gear.run import read_run_config
    from gear.train.loop import Trainer

    cfg = read_run_config(args.run_dir, args.overrides)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(args.run_dir)))
    _print_summary(Trainer(cfg, resume=True).fit(), "resume")


def _print_summary(summary, command: str) -> None:
    if summary is None:
        return
    if summary.stopped_by:
        print(f"gear {command}: stopped by {summary.stopped_by} at step {summary.step} with its checkpoint written; "
              f"continue with `gear resume {summary.run_dir}`")
        return
    keys = [k for k in summary.metrics if k.endswith("loss") or k.startswith("codebook/")]
    print(f"{summary.run_dir}: step {summary.step} in {summary.seconds:.0f} s; "
          + ", ".join(f"{k}={summary.metrics[k]:.4g}" for k in keys))


def cmd_sample(args: argparse.Namespace) -> None:
    from gear.run import GENERATOR_DIR, is_text_run, load_pair, model_dir
    from gear.sample import DEFAULT_PER_CLASS, SampleSettings, sample_grid

    if args.num is not None:
        return _sample_set(args)
    if args.npz is not None or args.batch_size is not None or args.labels is not None:
        raise ValueError("--npz, --batch-size and --labels belong to a sample set: add --num N (e.g. --num 50000 "
                         "--npz samples.npz)")
    args.per_class = args.per_class or DEFAULT_PER_CLASS
    args.out = args.out or "samples.png"
    if is_text_run(args.run_dir):
        return _sample_text(args)
    if args.prompt or args.prompts:
        raise ValueError(f"{args.run_dir} is class-conditional: choose classes with --classes, not prompts")
    tok, gen = load_pair(args.run_dir, ema=not args.live, device=args.device)
    if gen is None:
        model_dir(args.run_dir, GENERATOR_DIR)  # raises: names what is missing, as every loader does
    settings = SampleSettings(classes=tuple(args.classes), per_class=args.per_class, cfg_scale=args.cfg_scale,
                              cfg_interval=args.cfg_interval, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    sample_grid(tok, gen, settings, args.out)
    classes = settings.resolved_classes(gen.config.num_classes)
    print(f"wrote {args.out}: {len(classes)} classes x {args.per_class} samples, cfg {args.cfg_scale}")


def _sample_set(args: argparse.Namespace) -> None:
    """`gear sample RUN --num N --npz OUT.npz`, in one process or in each process torchrun starts."""
    import os

    from gear.run import is_text_run, load_pair
    from gear.sample_set import DEFAULT_CHUNK_SIZE, SampleSetSettings, write_sample_set
    from gear.train.distributed import DistEnv, setup_distributed, teardown_distributed

    if args.npz is None:
        raise ValueError("--num draws a sample set for the ADM evaluator: add --npz OUT.npz")
    if args.per_class is not None or args.out is not None:
        raise ValueError("--num writes the sample set to --npz, no grid: drop --per-class and --out")
    if args.prompt or args.prompts or is_text_run(args.run_dir):
        raise ValueError(f"sample sets (--num) are class-conditional; {args.run_dir} is text-conditioned")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device)
    if world_size > 1 and device.index is not None:
        raise ValueError(f"under torchrun pass --device {device.type}: each process takes cuda:LOCAL_RANK")
    env = setup_distributed(device.type) if world_size > 1 else DistEnv(device=device)
    try:
        tok, gen = load_pair(args.run_dir, ema=not args.live, device=str(env.device))
        if gen is None:
            raise FileNotFoundError(f"{args.run_dir} holds no generator: sample from a joint or ar run")
        settings = SampleSetSettings(num=args.num, classes=tuple(args.classes), labels=args.labels or "balanced",
                                     cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
                                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                     chunk_size=args.batch_size or DEFAULT_CHUNK_SIZE)
        source = f"{Path(args.run_dir).resolve()} ({'live' if args.live else 'EMA'})"
        result = write_sample_set(tok, gen, settings, args.npz, source=source, rank=env.rank,
                                  world_size=env.world_size, progress=env.is_main)
    finally:
        teardown_distributed()
    if env.is_main:
        print(f"wrote {result.path}: {result.num} samples ({settings.labels} labels over "
              f"{len(settings.resolved_classes(gen.config.num_classes))} classes), cfg {settings.cfg_scale}, "
              f"{env.world_size} process(es)")


def read_prompts(inline: list[str], path: str | None) -> list[str]:
    """--prompt values, then the non-blank lines of the --prompts file."""
    prompts = [p for p in inline if p.strip()]
    if path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"--prompts {file}: no such file (one prompt per line)")
        from_file = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not from_file:
            raise ValueError(f"--prompts {file} holds no prompt: write one prompt per line")
        prompts += from_file
    return prompts


def _sample_text(args: argparse.Namespace) -> None:
    from gear.text.grid import PromptSettings, sample_prompt_grid
    from gear.text.pipeline import load_text_to_image

    if args.classes:
        raise ValueError(f"{args.run_dir} is text-conditioned: pass prompts (--prompt, --prompts), not --classes")
    if args.cfg_interval != -1:
        raise ValueError("--cfg-interval is for class-conditional runs; a text-conditioned grid is guided on every token")
    prompts = read_prompts(args.prompt, args.prompts)
    if not prompts:
        raise ValueError(f"{args.run_dir} is text-conditioned: pass --prompt TEXT (repeatable) or --prompts FILE")
    pipe = load_text_to_image(args.run_dir, ema=not args.live, device=args.device)
    settings = PromptSettings(prompts=tuple(prompts), per_class=args.per_class, cfg_scale=args.cfg_scale,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    sample_prompt_grid(pipe, settings, args.out)
    print(f"wrote {args.out}: {len(prompts)} prompts x {args.per_class} samples, cfg {args.cfg_scale}")


def cmd_edit(args: argparse.Namespace) -> None:
    from gear.edit import EditSettings, edit, parse_region, read_image, save_edit_grid
    from gear.run import open_run

    region = parse_region(keep=args.keep, inpaint=args.inpaint, outpaint=args.outpaint, prefix_only=args.prefix_only)
    image = read_image(args.image)  # an unreadable image fails before any model is loaded
    run = open_run(args.run_dir)
    if run.kind == "tokenizer":
        raise ValueError(f"{args.run_dir} has no generator (a tokenizer run): edit with a joint or ar run")
    if run.kind == "text":
        from gear.text.pipeline import load_text_to_image

        model = load_text_to_image(run, ema=not args.live, device=args.device)
        tok = model.tokenizer
    else:
        tok, model = run.load_pair(ema=not args.live, device=args.device)
    settings = EditSettings(region=region, classes=tuple(args.classes), prompts=tuple(args.prompt), per_class=args.num,
                            cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed)
    save_edit_grid(edit(image, tok, model, settings), args.out)
    print(f"wrote {args.out}: {settings.rows} rows x {args.num} variants ({region.describe()}), "
          "each row: input | mask | variants")


def cmd_reconstruct(args: argparse.Namespace) -> None:
    import gear
    from gear.data.image_folder import load_rgb
    from gear.data.transforms import save_image_grid, square_view

    tok = gear.load_tokenizer(args.run_dir, ema=not args.live, map_location=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = args.size or _run_image_size(args.run_dir)
    for path in args.images:
        image = square_view(load_rgb(Path(path)), size).unsqueeze(0).to(args.device)
        with torch.no_grad():
            recon = tok.decode(tok.encode(image))
        target = out / (Path(path).stem + "_recon.png")
        save_image_grid(torch.cat([image, recon]).float().cpu(), target, nrow=2)
        print(f"wrote {target} (original | reconstruction)")


def _run_image_size(run_dir: str) -> int:
    from gear.run import CONFIG_FILE, read_run_config

    try:
        return read_run_config(run_dir).data.image_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{Path(run_dir) / CONFIG_FILE} not found; pass --size") from None


def cmd_eval(args: argparse.Namespace) -> None:
    from gear.eval import runs
    from gear.run import load_pair, read_run_config

    if args.what != "gen" and (args.cfg_interval, args.temperature, args.top_k, args.top_p) != (-1, 1.0, 0, 1.0):
        raise ValueError("--cfg-interval, --temperature, --top-k and --top-p belong to `gear eval gen`")
    if args.what == "adm":
        return _eval_adm(args)
    if args.ref is not None or args.inception_weights is not None:
        raise ValueError("--ref and --inception-weights belong to `gear eval adm SAMPLES.npz --ref REF.npz`")
    data = read_run_config(args.run_dir).data
    cache = Path(args.cache_dir) if args.cache_dir else None
    if args.what == "t2i":
        return _eval_t2i(args, data, cache)
    if args.what == "gen" and data.name in ("fashion-mnist-captions", "jsonl", "webdataset"):
        raise ValueError(f"{args.run_dir} is text-conditioned: measure it with `gear eval t2i`")
    tok, gen = load_pair(args.run_dir, ema=not args.live, device=args.device)
    classifier = None
    if args.feature == "classifier" or (args.what == "gen" and data.name == "fashion-mnist"):
        classifier = runs.reference_classifier(data, cache, device=args.device)
    if args.what == "gen":
        if gen is None:
            raise FileNotFoundError(f"{args.run_dir} holds no generator: evaluate a joint or ar run")
        metrics = runs.generation_metrics(tok, gen, data, num=args.num, cfg_scale=args.cfg_scale,
                                          cfg_interval=args.cfg_interval, temperature=args.temperature,
                                          top_k=args.top_k, top_p=args.top_p, feature=args.feature,
                                          batch_size=args.batch_size, seed=args.seed, classifier=classifier,
                                          cache_dir=cache, npz=args.npz, progress=True)
    else:
        metrics = runs.reconstruction_metrics(tok, data, num=args.num, feature=args.feature, batch_size=args.batch_size,
                                              classifier=classifier, progress=True)
    print(runs.write_json({"run": str(args.run_dir), "what": args.what, **metrics}, args.out))


def _eval_adm(args: argparse.Namespace) -> None:
    """The ADM evaluator's gFID, sFID, IS and precision/recall of a sample .npz against a reference batch."""
    from gear.eval.adm import ADMEvaluator
    from gear.eval.runs import default_cache_dir, write_json

    if args.ref is None:
        raise ValueError("gear eval adm needs --ref REF.npz, the reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)")
    evaluator = ADMEvaluator(device=args.device, inception_weights=args.inception_weights, batch_size=args.batch_size,
                             progress=True)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    metrics = evaluator.evaluate(args.run_dir, args.ref, cache_dir=cache)
    print(write_json({"samples": str(args.run_dir), "ref": str(args.ref), "what": "adm", **vars(metrics)}, args.out))


def _eval_t2i(args: argparse.Namespace, data, cache) -> None:
    import dataclasses

    from gear.eval import runs
    from gear.eval.t2i import t2i_metrics
    from gear.run import load_pair
    from gear.text.pipeline import load_text_to_image

    scales = tuple(float(s) for s in args.cfg_scales.split(","))
    pipe = load_text_to_image(args.run_dir, ema=not args.live, device=args.device)
    if data.name != "fashion-mnist-captions":
        raise ValueError(f"gear eval t2i measures runs on captioned Fashion-MNIST, not data.name={data.name}")
    # the same images as plain Fashion-MNIST: the class runs' cached reference classifier
    classifier = runs.reference_classifier(dataclasses.replace(data, name="fashion-mnist"), cache, device=args.device)
    ceiling = load_pair(args.ceiling, ema=not args.live, device=args.device) if args.ceiling else None
    if ceiling is not None and ceiling[1] is None:
        raise FileNotFoundError(f"--ceiling {args.ceiling} holds no generator: pass a class-conditional ar run")
    metrics = t2i_metrics(pipe, data, classifier, num=args.num, cfg_scales=scales, batch_size=args.batch_size,
                          seed=args.seed, ceiling=ceiling, progress=True)
    print(runs.write_json({"run": str(args.run_dir), "what": "t2i", "ceiling_run": args.ceiling, **metrics}, args.out))


def cmd_convert(args: argparse.Namespace) -> None:
    from gear.models.autoencoder import TOKENIZER_PRESETS, TokenizerConfig
    from gear.models.gpt import GPT_PRESETS, GPTConfig
    from gear.models.pretrained import CONFIG_NAME, ModelOrigin
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
    overrides = _config_overrides(args.overrides, config_class)
    model, weights = load(args.src, args.preset, ema=not args.live, **overrides)
    model.save_pretrained(out, ModelOrigin(converted_from=f"{args.src} ({weights.describe()})"))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {model.kind} {args.preset} ({n:,} parameters) from {args.src}: {weights.describe()}")


def cmd_export(args: argparse.Namespace) -> None:
    from gear.models.export import export

    print(export(args.src, args.format, args.out, live=args.live).describe())


def _config_overrides(items: list[str], config_class: type) -> dict:
    """``key=value`` strings -> typed fields of ``config_class`` (values are YAML: channel_mult=[1,2,2])."""
    import typing

    import yaml

    from gear.config import coerce

    hints = typing.get_type_hints(config_class)
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"{item!r} is not a {config_class.__name__} key=value; valid keys: {sorted(hints)}")
        out[key] = coerce(yaml.safe_load(raw), hints[key], key)
    return out


def cmd_serve(args: argparse.Namespace) -> None:
    from gear.serve import serve

    serve(args.run_dir, host=args.host, port=args.port, device=args.device, auth_file=args.auth_file,
          no_auth=args.no_auth)


def add_sampling_options(s: argparse.ArgumentParser, cfg_scale: float) -> None:
    """--cfg-scale, --cfg-interval, --temperature, --top-k, --top-p: the sampling options of `sample` and `eval gen`."""
    s.add_argument("--cfg-scale", type=at_least(0.0, float), default=cfg_scale, help="1 = no guidance, 0 = unconditional")
    s.add_argument("--cfg-interval", type=at_least(-1), default=-1, help="-1 = guidance on every token; N = on the "
                   "prefill's token and the N + 1 after it, then the conditional logits alone (LlamaGen's, GEAR's)")
    s.add_argument("--temperature", type=at_least(0.0, float, strict=True), default=1.0)
    s.add_argument("--top-k", type=at_least(0), default=0, help="0 = off")
    s.add_argument("--top-p", type=unit_interval, default=1.0, help="1.0 = off")


def build_parser() -> argparse.ArgumentParser:
    from gear.config import EvalConfig

    cfg_scale = EvalConfig().cfg_scale
    p = Parser(prog="gear", description="GEAR: joint VQ tokenizer + autoregressive generator training")
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

    s = sub.add_parser("sample", help="sample grid from a run directory: classes, or prompts for a text-conditioned "
                       "run; with --num N, a sample set for the ADM evaluator (also under torchrun)")
    s.add_argument("run_dir")
    s.add_argument("--classes", type=class_ids, default=[],
                   help="comma-separated class ids (default: the first up to 10 in a grid, every class in a set)")
    s.add_argument("--prompt", action="append", default=[], help="a caption (text-conditioned runs); repeat for more")
    s.add_argument("--prompts", default=None, help="a text file of captions, one per line (text-conditioned runs)")
    s.add_argument("--per-class", type=at_least(1), default=None, help="samples per class or per prompt (default 8)")
    s.add_argument("--num", type=at_least(1), default=None, help="draw a sample set of N images to --npz instead "
                   "of a grid (e.g. 50000 for the paper's table)")
    s.add_argument("--npz", default=None, help="with --num: the .npz to write (uint8 NHWC arr_0, labels arr_1)")
    s.add_argument("--labels", choices=["balanced", "random"], default=None, help="with --num: class-balanced "
                   "(default) or drawn uniformly at random as LlamaGen's sampler does")
    s.add_argument("--batch-size", type=at_least(1), default=None, help="with --num: samples per chunk (default "
                   "100); a chunk is one batch with its own seed, so this is part of what decides the images")
    add_sampling_options(s, cfg_scale)
    s.add_argument("--seed", type=at_least(0), default=0)
    s.add_argument("--live", action="store_true", help="use the live weights instead of the EMA")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps; under torchrun: cpu or cuda")
    s.add_argument("--out", default=None, help="the grid PNG (default samples.png)")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("edit", help="complete, inpaint or outpaint an image with a run's AR: the kept tokens are forced, "
                       "the rest sampled; a grid of input | mask | variants per class or prompt")
    s.add_argument("run_dir")
    s.add_argument("image", help="a PNG, JPEG, WebP, BMP or GIF file (seen as the tokenizer sees it: centre crop)")
    region = s.add_mutually_exclusive_group()
    region.add_argument("--keep", help="top:N or left:N token rows/columns kept (or top:P%%, left:P%%)")
    region.add_argument("--inpaint", help="X0,Y0,X1,Y1: the rectangle to generate, in pixels of IMAGE; the rest is kept")
    region.add_argument("--outpaint", help="down:N or right:N: the image shifted up/left by N token rows/columns, "
                        "the uncovered part generated")
    s.add_argument("--prefix-only", action="store_true", help="keep only the tokens before the first generated one "
                   "in raster order (a sampled token never sees kept tokens after it; this resamples them too)")
    s.add_argument("--classes", type=class_ids, default=[], help="comma-separated class ids, a row each")
    s.add_argument("--prompt", action="append", default=[], help="a caption, a row each (text-conditioned runs)")
    s.add_argument("--num", type=at_least(1), default=8, help="variants per class or prompt")
    s.add_argument("--cfg-scale", type=at_least(0.0, float), default=cfg_scale, help="1 = no guidance, 0 = unconditional")
    s.add_argument("--temperature", type=at_least(0.0, float, strict=True), default=1.0)
    s.add_argument("--top-k", type=at_least(0), default=0, help="0 = off")
    s.add_argument("--top-p", type=unit_interval, default=1.0, help="1.0 = off")
    s.add_argument("--seed", type=at_least(0), default=0)
    s.add_argument("--live", action="store_true", help="use the live weights instead of the EMA")
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", default="edit.png")
    s.set_defaults(func=cmd_edit)

    s = sub.add_parser("reconstruct", help="encode and decode images with a run's tokenizer")
    s.add_argument("run_dir")
    s.add_argument("images", nargs="+")
    s.add_argument("--out", default="reconstructions")
    s.add_argument("--size", type=at_least(0), default=0, help="image size (default: the run's data.image_size)")
    s.add_argument("--live", action="store_true")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_reconstruct)

    s = sub.add_parser("eval", help="metrics of a run: gen (FID, precision/recall, class accuracy), recon (rFID, PSNR, "
                       "SSIM) or t2i (text adherence of a captioned Fashion-MNIST run); adm: the ADM evaluator's "
                       "gFID/sFID/IS/precision/recall of a sample .npz against --ref")
    s.add_argument("what", choices=["gen", "recon", "t2i", "adm"])
    s.add_argument("run_dir", help="the run directory; for adm, the samples .npz (uint8 NHWC under arr_0)")
    s.add_argument("--num", type=at_least(2), default=1000, help="samples / held-out images (Inception: ~4 images/s on 2 CPU cores)")
    add_sampling_options(s, cfg_scale)  # gen; t2i takes --cfg-scales
    s.add_argument("--feature", choices=["inception", "classifier"], default="inception",
                   help="inception: the standard FID network; classifier: the Fashion-MNIST reference classifier (fast)")
    s.add_argument("--batch-size", type=at_least(1), default=50)
    s.add_argument("--seed", type=at_least(0), default=0)
    s.add_argument("--cfg-scales", default="1.0,3.0", help="t2i: guidance scales to measure (the last one is the headline)")
    s.add_argument("--ceiling", default=None, help="t2i: a class-conditional run whose class accuracy is the ceiling")
    s.add_argument("--npz", default=None, help="also write the samples as an ADM-evaluator .npz (uint8 NHWC, arr_0)")
    s.add_argument("--ref", default=None, help="adm: the reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz")
    s.add_argument("--inception-weights", default=None, help="adm: pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                   "(its fc.weight gives the Inception Score; default: looked up in $TORCH_HOME/hub/checkpoints)")
    s.add_argument("--cache-dir", default=None, help="where reference statistics, the classifier and adm reference "
                   "activations are cached (default $GEAR_CACHE or ~/.cache/gear)")
    s.add_argument("--live", action="store_true")
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", default=None, help="write the metrics JSON here too")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("convert", help="a released checkpoint file -> a model directory (config.json + model.safetensors)")
    s.add_argument("src", help="a .pt / .pth / .ckpt / .bin / .safetensors file, or hf://OWNER/REPO/FILE on the Hub "
                   "(see README: released files)")
    s.add_argument("overrides", nargs="*", help="config overrides of the preset, e.g. grid_size=24 for a 384 px GPT")
    s.add_argument("--preset", required=True, help="the file's architecture (see `gear presets`)")
    s.add_argument("--out", required=True, help="directory to write; use RUN/tokenizer and RUN/generator for `gear sample RUN`")
    s.add_argument("--live", action="store_true", help="the live weights instead of the EMA copy the file may hold")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("export", help="a model or run directory -> LlamaGen's or GEAR's checkpoint layout, for their "
                       "own sampling and evaluation scripts")
    s.add_argument("src", help="a model directory, a run directory, or hf://OWNER/REPO[/FOLDER]")
    s.add_argument("--format", required=True, choices=["llamagen", "gear"],
                   help="llamagen: --out is a directory for tokenizer.pt (as vq_ds16_c2i.pt, VQ only) and/or "
                   "generator.pt (as c2i_*.pt); gear: --out is one file as GEAR's train_gear.py checkpoints")
    s.add_argument("--out", required=True)
    s.add_argument("--live", action="store_true", help="llamagen, run directory: the live weights instead of the EMA")
    s.set_defaults(func=cmd_export)

    from gear.serve import DEFAULT_HOST, DEFAULT_PORT

    s = sub.add_parser("serve", help="a local web page to explore a run: sample, edit, reconstruct, training curves")
    s.add_argument("run_dir")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: this machine only); any other "
                   "than loopback needs --auth-file or --no-auth")
    s.add_argument("--auth-file", default=None, help="a file of user:password lines: the page asks for one of these logins")
    s.add_argument("--no-auth", action="store_true", help="serve beyond loopback without a login (anyone who reaches "
                   "the port can use the page)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_serve)
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
    from gear.devices import parse_device
    from gear.train.guard import RunStopped

    # library warnings (a truncated prompt, a skipped sample) as one line each, while the command runs
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest, **kw: f"gear {args.command}: warning: {message}\n"
    try:
        if getattr(args, "device", None) is not None:  # checked before any model is loaded onto it
            args.device = str(parse_device(args.device))
        args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as err:
        return _fail(args.command, one_line(err), 2)
    except (RunStopped, OSError) as err:  # the run failed: diverged, disk full, permissions
        return _fail(args.command, one_line(err), 1)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", 130)
    finally:
        warnings.formatwarning = previous_format
    return 0


def _fail(command: str, message: str, status: int) -> int:
    print(f"gear {command}: error: {message}", file=sys.stderr)
    return status


def one_line(err: BaseException) -> str:
    """The first line of an error; for an error re-raised from a DataLoader worker, the original's last line."""
    text = str(err).strip()
    if isinstance(err, OSError) and err.filename and not text.startswith("cannot write"):
        return f"{err.filename}: {err.strerror or text}"
    if not text:
        return type(err).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "Original Traceback" in text:  # torch.utils.data's ExceptionWrapper
        return lines[-1].split(": ", 1)[-1]
    return lines[0]


if __name__ == "__main__":
    sys.exit(main())
