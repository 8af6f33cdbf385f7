"""Editing with the AR: known tokens forced through every decode path (cached, static-cache/graph-shaped, text),
equal to a cache-free reference; regions (keep, inpaint, outpaint, prefix-only) and their errors; `gear edit`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_runs
from PIL import Image

from gear.cli import main
from gear.data.fashion_mnist import resolve_root
from gear.data.transforms import square_view
from gear.edit import EditSettings, edit, parse_region, save_edit_grid
from gear.models import sampling
from gear.models.autoencoder import build_tokenizer
from gear.models.gpt import GPT, GPTConfig, build_generator
from gear.models.gpt_t2i import TextCondition, TextGPT
from gear.models.sampling import KnownTokens, StaticKVCache, sample_logits

GRID = 4


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def class_model() -> GPT:
    torch.manual_seed(0)
    return randomize(GPT(GPTConfig(vocab_size=32, grid_size=GRID, num_classes=5, dim=64, n_layer=2, n_head=4,
                                   multiple_of=32)))


def text_model() -> TextGPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, grid_size=GRID, num_classes=1, dim=64, n_layer=3, n_head=4, multiple_of=32,
                    condition="text", text_dim=12, text_len=5)
    return randomize(TextGPT(cfg))


def captions(batch: int) -> TextCondition:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, :2] = False  # a shorter caption, left-padded
    return TextCondition(torch.randn(batch, 5, 12, generator=g), mask)


def some_known(batch: int, seed: int = 2) -> KnownTokens:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, GRID, GRID, generator=g) < 0.5
    mask[:, 0, 0] = True  # the first token known too: the class token's own sample is replaced
    return KnownTokens(torch.randint(0, 32, (batch, GRID, GRID), generator=g), mask)


def reference(model, cond, known: KnownTokens, *, cfg_scale: float, seed: int, null, **filters) -> torch.Tensor:
    """Without a cache: a full forward over the whole prefix per token; a known token replaces each sample."""
    gen = torch.Generator().manual_seed(seed)
    guided = cfg_scale != 1.0
    both = null(cond) if guided else cond
    batch = known.tokens.shape[0]
    flat_tokens, flat_mask = known.tokens.reshape(batch, -1), known.mask.reshape(batch, -1)
    tokens = torch.empty(batch, 0, dtype=torch.long)
    with torch.no_grad():
        for t in range(GRID * GRID):
            logits = model(torch.cat([tokens, tokens]) if guided else tokens, both).logits[:, -1]
            if guided:
                c, u = logits.chunk(2)
                logits = u + cfg_scale * (c - u)
            nxt = sample_logits(logits, generator=gen, **filters)
            nxt = torch.where(flat_mask[:, t], flat_tokens[:, t], nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    return tokens.view(batch, GRID, GRID)


def with_null_class(model):
    return lambda labels: torch.cat([labels, torch.full_like(labels, model.null_class)])


def with_null_caption(model):
    return lambda text: TextCondition.cat([text, model.null_condition(len(text), text.features.shape[1])])


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_cached_decode_with_known_tokens_equals_the_cache_free_reference(cfg_scale):
    model = class_model()
    labels, known = torch.tensor([1, 3, 0]), some_known(3)
    got = model.generate(labels, cfg_scale=cfg_scale, seed=4, top_k=20, known=known)
    assert torch.equal(got[known.mask], known.tokens[known.mask])
    expected = reference(model, labels, known, cfg_scale=cfg_scale, seed=4, null=with_null_class(model), top_k=20)
    assert torch.equal(got, expected)


def test_the_graph_shaped_decode_with_known_tokens_equals_the_reference():
    """The CUDA-graph decode's step (static cache, position as a tensor), driven on a CPU through the shared loop."""
    model = class_model()
    cfg = model.config
    labels, known = torch.tensor([2, 4]), some_known(2, seed=7)
    cfg_scale = 1.7
    cond = with_null_class(model)(labels)
    tokens = torch.empty(2, cfg.seq_len, dtype=torch.long)
    cache = StaticKVCache(cfg.n_layer, cfg.seq_len)
    with torch.no_grad():
        sampling.decode(lambda x, t: model.forward_cached(x, torch.tensor([t]), cache)[:, -1], model.cls_embedding(cond),
                        model.tok_embeddings, tokens, cfg_scale=cfg_scale, temperature=0.8, top_k=0, top_p=0.9,
                        generator=torch.Generator().manual_seed(9), on_token=None,
                        known=known.flat(2, GRID, cfg.vocab_size, torch.device("cpu")))
    expected = reference(model, labels, known, cfg_scale=cfg_scale, seed=9, null=with_null_class(model), temperature=0.8,
                         top_p=0.9)
    assert torch.equal(tokens.view(2, GRID, GRID), expected)


@pytest.mark.cuda
def test_cuda_graph_decode_with_known_tokens_gives_the_eager_tokens():
    model = class_model().cuda()
    labels, known = torch.tensor([1, 3, 0], device="cuda"), some_known(3)
    eager = sampling.generate(model, labels, cfg_scale=1.5, seed=0, cuda_graph=False, known=known)
    graphed = sampling.generate(model, labels, cfg_scale=1.5, seed=0, cuda_graph=True, known=known)
    assert torch.equal(graphed, eager) and torch.equal(graphed.cpu()[known.mask], known.tokens[known.mask])


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_text_conditioned_decode_with_known_tokens_equals_the_reference(cfg_scale):
    model = text_model()
    text, known = captions(2), some_known(2, seed=5)
    got = model.generate(text, cfg_scale=cfg_scale, seed=1, known=known)
    assert torch.equal(got[known.mask], known.tokens[known.mask])
    assert torch.equal(got, reference(model, text, known, cfg_scale=cfg_scale, seed=1, null=with_null_caption(model)))


def test_nothing_known_is_plain_sampling_and_one_grid_serves_a_batch():
    model = class_model()
    labels = torch.tensor([1, 2, 3])
    none = KnownTokens(torch.zeros(GRID, GRID, dtype=torch.long), torch.zeros(GRID, GRID, dtype=torch.bool))
    assert torch.equal(model.generate(labels, seed=3, known=none), model.generate(labels, seed=3))
    one = some_known(1)
    shared = KnownTokens(one.tokens[0], one.mask[0])  # (H, W): the same for every row
    got = model.generate(labels, seed=3, known=shared)
    assert (got[:, one.mask[0]] == one.tokens[0][one.mask[0]]).all()


@pytest.mark.parametrize("known, match", [
    (KnownTokens(torch.zeros(3, 3, dtype=torch.long), torch.ones(3, 3, dtype=torch.bool)), r"\(2, 4, 4\) or \(4, 4\)"),
    (KnownTokens(torch.zeros(GRID, GRID), torch.ones(GRID, GRID, dtype=torch.bool)), "int64"),
    (KnownTokens(torch.full((GRID, GRID), 32), torch.ones(GRID, GRID, dtype=torch.bool)), r"codes in \[0, 32\)"),
])
def test_bad_known_tokens_raise_value_error(known, match):
    with pytest.raises(ValueError, match=match):
        class_model().generate(torch.tensor([1, 2]), known=known)


# ---------------------------------------------------------------------- regions and the edit helper


@pytest.fixture(scope="module")
def pair():
    """vq-tiny (8x8 tokens of 32 px) and a random gpt-tiny over its codebook."""
    torch.manual_seed(0)
    tok = build_tokenizer("vq-tiny").eval()
    gen = randomize(build_generator("gpt-tiny", vocab_size=tok.codebook_size, grid_size=8, num_classes=10))
    return tok, gen


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(path)  # 48 wide, 40 high
    return path


def kept(rows=slice(None), cols=slice(None)) -> torch.Tensor:
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


@pytest.mark.parametrize("region, expected_mask, shift", [
    (dict(keep="top:3"), kept(slice(0, 3)), (0, 0)),
    (dict(keep="top:50%"), kept(slice(0, 4)), (0, 0)),
    (dict(keep="left:25%"), kept(cols=slice(0, 2)), (0, 0)),
    (dict(outpaint="down:2"), kept(slice(0, 6)), (2, 0)),
    (dict(outpaint="right:3"), kept(cols=slice(0, 5)), (0, 3)),
    # 48x40 -> short side 40 to 32: 38x32, cropped from x = 3; x 14..30 -> 8.1..20.8 px of the crop -> token
    # columns 2..5; y 8..20 -> 6.4..16 px -> rows 1..3
    (dict(inpaint="14,8,30,20"), ~kept(slice(1, 4), slice(2, 6)), (0, 0)),
    (dict(inpaint="14,8,30,20", prefix_only=True), torch.arange(64).view(8, 8) < 10, (0, 0)),
    (dict(keep="left:2", prefix_only=True), kept(slice(0, 0)) | (torch.arange(64).view(8, 8) < 2), (0, 0)),
])
def test_every_region_keeps_its_tokens_unchanged_in_the_sampled_grids(pair, photo, region, expected_mask, shift):
    tok, gen = pair
    settings = EditSettings(region=parse_region(**region), classes=(1, 6), per_class=3, cfg_scale=2.0, seed=3)
    steps = []
    result = edit(photo, tok, gen, settings, on_token=lambda done, total: steps.append(done))
    assert steps == list(range(1, 65))
    assert torch.equal(result.known.mask, expected_mask)
    encoded = tok.encode(square_view(Image.open(photo), 32).unsqueeze(0))[0]
    rows, cols = shift
    shifted = encoded[rows:, cols:]  # the image moved up or left by the added rows or columns
    assert torch.equal(result.known.tokens[: 8 - rows, : 8 - cols], shifted)
    assert result.tokens.shape == (6, 8, 8)
    for grid in result.tokens:  # every variant of every row holds the kept tokens, where they are kept
        assert torch.equal(grid[expected_mask], result.known.tokens[expected_mask])
    assert not (result.tokens[:, ~expected_mask] == result.known.tokens[~expected_mask]).all()  # the rest is sampled
    assert result.images.shape == (6, 3, 32, 32) and result.grid_images().shape == (10, 3, 32, 32)
    tile = result.canvas.permute(1, 2, 0)
    px = expected_mask.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert (tile[~px] == 0).all()  # the generated part is grey on the mask tile
    if shift == (0, 0):
        assert torch.equal(tile[px], result.original.permute(1, 2, 0)[px])


def test_variants_follow_the_seed_and_the_class(pair, photo):
    tok, gen = pair
    base = dict(region=parse_region(keep="top:4"), per_class=2, cfg_scale=1.5)
    a = edit(photo, tok, gen, EditSettings(classes=(1, 6), seed=0, **base))
    assert torch.equal(a.tokens, edit(photo, tok, gen, EditSettings(classes=(1, 6), seed=0, **base)).tokens)
    assert not torch.equal(a.tokens, edit(photo, tok, gen, EditSettings(classes=(1, 6), seed=1, **base)).tokens)
    assert not torch.equal(a.tokens[:2], a.tokens[2:])


@pytest.mark.parametrize("region, message", [
    (dict(keep="top:0"), "keeps nothing of the 8 token rows"),
    (dict(keep="left:0%"), "keeps nothing of the 8 token columns"),
    (dict(keep="top:8"), "nothing is left to generate"),
    (dict(keep="top:100%"), "nothing is left to generate"),
    (dict(keep="top:150%"), "a percentage must be in 0..100"),
    (dict(outpaint="down:0"), "adds nothing"),
    (dict(outpaint="right:8"), "nothing is kept"),
    (dict(inpaint="0,0,48,40"), "covers the whole token grid"),
    (dict(inpaint="10,10,60,20"), "outside the 48x40 px image"),
    (dict(inpaint="20,10,10,20"), "outside the 48x40 px image"),
    (dict(inpaint="0,0,2,40"), "the centre crop drops"),
    (dict(inpaint="3,0,20,20", prefix_only=True), "the first token is generated"),
])
def test_bad_regions_are_refused_by_name(pair, photo, region, message):
    tok, gen = pair
    with pytest.raises(ValueError, match=message):
        edit(photo, tok, gen, EditSettings(region=parse_region(**region), classes=(1,)))


@pytest.mark.parametrize("args, message", [
    (dict(keep="middle:4"), "write top:N or left:N"),
    (dict(keep="top:x"), "write top:N or left:N"),
    (dict(outpaint="up:2"), "write down:N or right:N"),
    (dict(inpaint="1,2,3"), "write X0,Y0,X1,Y1"),
    (dict(), "choose one region"),
    (dict(keep="top:4", outpaint="down:2"), "choose one region"),
])
def test_unparsable_regions(args, message):
    with pytest.raises(ValueError, match=message):
        parse_region(**args)


def test_conditions_are_checked(pair, photo, tmp_path):
    tok, gen = pair
    region = parse_region(keep="top:4")
    with pytest.raises(ValueError, match="pick at least one class"):
        edit(photo, tok, gen, EditSettings(region=region))
    with pytest.raises(ValueError, match=r"classes 12 are outside this generator's classes 0..9"):
        edit(photo, tok, gen, EditSettings(region=region, classes=(12,)))
    with pytest.raises(ValueError, match="class-conditional: choose classes, not prompts"):
        edit(photo, tok, gen, EditSettings(region=region, prompts=("a coat",)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not an image")
    with pytest.raises(ValueError, match="broken.png is not an image gear can read"):
        edit(broken, tok, gen, EditSettings(region=region, classes=(1,)))


def test_the_grid_holds_input_mask_and_variants_per_row(pair, photo, tmp_path):
    tok, gen = pair
    result = edit(photo, tok, gen, EditSettings(region=parse_region(outpaint="right:2"), classes=(0, 4), per_class=3))
    grid = np.asarray(Image.open(save_edit_grid(result, tmp_path / "g.png")))
    assert grid.shape == (2 * 34 + 2, 5 * 34 + 2, 3)
    original = square_view(Image.open(photo), 32).add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(grid[2:34, 2:34], original) and np.array_equal(grid[36:68, 2:34], original)
    assert (grid[2:34, 36 + 24 : 36 + 32] == 128).all()  # two generated columns: grey on the mask tile


# ---------------------------------------------------------------------- the command


pytestmark_data = pytest.mark.skipif(not (resolve_root() / "train-images-idx3-ubyte.gz").is_file(),
                                     reason="Fashion-MNIST idx files not installed")


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("runs"))[1]


@pytestmark_data
def test_gear_edit_writes_the_grid_and_refuses_bad_input_in_one_line(ar_run, photo, tmp_path, capsys):
    out = tmp_path / "edit.png"
    assert main(["edit", str(ar_run), str(photo), "--keep", "top:50%", "--classes", "3,7", "--num", "2",
                 "--cfg-scale", "2.0", "--seed", "5", "--out", str(out)]) == 0
    assert "2 rows x 2 variants" in capsys.readouterr().out
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 34 + 2, 4 * 34 + 2, 3)
    cases = [
        (["--keep", "top:0"], "keeps nothing"),
        (["--keep", "top:8"], "nothing is left to generate"),
        (["--inpaint", "0,0,99,10"], "outside the 48x40 px image"),
        (["--outpaint", "down:9"], "nothing is kept"),
        (["--keep", "top:4", "--prompt", "a coat"], "class-conditional: choose classes, not prompts"),
        (["--keep", "top:4", "--classes", "10"], "outside this generator's classes 0..9"),
    ]
    for args, message in cases:
        argv = ["edit", str(ar_run), str(photo), *args, "--out", str(tmp_path / "x.png")]
        if "--classes" not in args and "--prompt" not in args:
            argv += ["--classes", "1"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("gear edit: error: ") and message in err and err.count("\n") == 1, err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    assert main(["edit", str(ar_run), str(broken), "--keep", "top:4", "--classes", "1"]) == 2
    err = capsys.readouterr().err
    assert err == "gear edit: error: broken.jpg is not an image gear can read: give a PNG, JPEG, WebP, BMP or GIF file\n"
    assert main(["edit", str(ar_run), str(photo), "--classes", "1"]) == 2
    assert "choose one region" in capsys.readouterr().err


@pytestmark_data
def test_the_completion_benchmark_runs_end_to_end(pair):
    """benchmarks/edit_completion.py on tiny random models and an untrained classifier: every number comes out."""
    import importlib
    import sys
    from pathlib import Path

    from gear.data import DataConfig
    from gear.eval.classifier import Classifier, ClassifierConfig
    from gear.eval.runs import ReferenceClassifier

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    bench = importlib.import_module("edit_completion")
    tok, gen = pair
    torch.manual_seed(0)
    classifier = ReferenceClassifier(Classifier(ClassifierConfig()).eval(), test_accuracy=0.5)
    m = bench.completion_metrics(tok, gen, DataConfig(name="fashion-mnist", image_size=32), classifier, num=6,
                                 cfg_scale=1.5, seed=0, batch_size=4, device="cpu")
    assert m["num"] == 6 and m["kept"] == "top 4 of 8 token rows"
    for key in ("acc_original", "acc_completion_true_class", "acc_completion_other_class_as_other"):
        assert 0.0 <= m[key] <= 1.0
    assert 0 < m["psnr_top_half_completion_true_class"] < 100
    assert "| completions, another class |" in bench.table(m)
