"""`gear serve`: the page's logic on a tiny trained run (sampling = `gear sample`, reconstruction, curves, bad
input), the running server through its API, and the CLI's one-line errors. The real-browser test is
test_serve_browser.py (slow)."""

from __future__ import annotations

import json
import shlex
import shutil
import socket

import numpy as np
import pytest
from helpers import tiny_runs
from PIL import Image

from gear.cli import main
from gear.data.fashion_mnist import resolve_root
from gear.data.transforms import square_view
from gear.run import read_metrics
from gear.sample import SampleSettings
from gear.serve import check_port
from gear.serve.curves import PANEL_TITLES, curve_panels
from gear.serve.explorer import RunExplorer, code_colours
from gear.text.grid import PromptSettings

gr = pytest.importorskip("gradio", reason="the serve extra (gradio) is not installed: pip install -e '.[serve]'")

from gear.serve.app import build_app, launch, prompt_settings_from_page, settings_from_page  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (resolve_root() / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST idx files not installed"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def explorer(runs, tmp_path_factory):
    return RunExplorer(runs[1], out_dir=tmp_path_factory.mktemp("page"))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_grid_is_what_its_gear_sample_command_writes(explorer, tmp_path):
    settings = SampleSettings(classes=(3, 1), per_class=2, cfg_scale=2.0, temperature=0.9, top_k=50, top_p=0.95, seed=5)
    steps = []
    result = explorer.sample(settings, on_token=lambda done, total: steps.append((done, total)))
    assert steps == [(t, 64) for t in range(1, 65)]  # 8x8 tokens, one call per position
    argv = shlex.split(result.command)
    assert argv[:3] == ["gear", "sample", explorer.run_dir]
    argv[argv.index("--out") + 1] = str(tmp_path / "cli.png")
    assert main(argv[1:]) == 0
    page, cli = pixels(result.path), pixels(tmp_path / "cli.png")
    assert page.shape == (2 * 34 + 2, 2 * 34 + 2, 3) and np.array_equal(page, cli)
    other = explorer.sample(SampleSettings(classes=(3, 1), per_class=2, cfg_scale=2.0, temperature=0.9, top_k=50,
                                           top_p=0.95, seed=6))
    assert not np.array_equal(pixels(other.path), page)  # the seed matters


def test_reconstruction_token_map_and_psnr(explorer, runs, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8)).save(image)
    r = explorer.reconstruct(image)
    codes = explorer.tok.encode(square_view(Image.open(image), 32).unsqueeze(0))[0].numpy()
    assert r.indices.shape == (8, 8) and np.array_equal(r.indices, codes)
    assert main(["reconstruct", str(runs[1]), str(image), "--out", str(tmp_path / "rec")]) == 0
    grid = pixels(tmp_path / "rec" / "in_recon.png")  # [original | reconstruction], 2 px padding
    assert np.array_equal(grid[2:34, 2:34], r.original) and np.array_equal(grid[2:34, 36:68], r.reconstruction)
    mse = np.mean((r.original.astype(np.float64) - r.reconstruction.astype(np.float64)) ** 2)
    assert r.psnr == pytest.approx(10 * np.log10(255**2 / mse))
    colours = {tuple(c) for c in r.colours.reshape(-1, 3).tolist()}
    assert len(colours) == len(np.unique(r.indices))  # one colour per code, distinct codes look different
    assert np.array_equal(code_colours(np.array([7, 7, 9]))[0], code_colours(np.array([7]))[0])


def test_curves_from_metrics_jsonl(explorer, tmp_path):
    panels = {p.title: p for p in explorer.curves()}
    assert [p.title for p in explorer.curves()] == list(PANEL_TITLES)
    assert {"ar/loss", "ar/ntp"} <= set(panels["Losses"].metrics)
    assert [r["step"] for r in panels["Losses"].rows if r["metric"] == "ar/loss"] == [1, 2]
    assert "ar/align_cos" in panels["Alignment"].metrics and not panels["FID"].rows

    records = [{"step": 10, "tok/loss": 2.0, "codebook/usage_window": 0.5}, {"step": 20, "eval/fid": 80.0, "eval/num": 500}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + '\n{"step": 30, "tok/lo')
    panels = {p.title: p for p in curve_panels(read_metrics(tmp_path))}  # the half-written last line is skipped
    assert panels["Losses"].rows == [{"step": 10, "value": 2.0, "metric": "tok/loss"}]
    assert panels["FID"].rows == [{"step": 20, "value": 80.0, "metric": "eval/fid"}]
    assert panels["Codebook usage"].metrics == ["codebook/usage_window"]
    assert read_metrics(tmp_path / "nothing-here") == []


@pytest.mark.parametrize("values, message", [
    (([], 2, 1.5, 1.0, 0, 1.0, 0), "pick at least one class"),
    (([12], 2, 1.5, 1.0, 0, 1.0, 0), "outside this generator's classes 0..9"),
    (([1], 2, 1.5, 1.0, 0, 1.0, None), "seed must be a whole number"),
    (([1], 2.5, 1.5, 1.0, 0, 1.0, 0), "samples per class must be a whole number"),
    (([1], 2, 1.5, 0.0, 0, 1.0, 0), "temperature must be > 0"),
    (([1], 2, 1.5, 1.0, 100_000, 1.0, 0), "top-k must be in 0..512"),
    (([1], 2, 1.5, 1.0, 0, 0.0, 0), "top-p must be in (0, 1]"),
    (([1], 2, 1.5, 1.0, 0, 1.0, -3), "seed must be >= 0"),
    (([1], 2, 1.5, 1.0, 0, 1.0, 2**64), "seed must be >= 0 and < 2\\*\\*63"),
    ((list(range(10)), 17, 1.5, 1.0, 0, 1.0, 0), "more than the page draws at once"),
])
def test_bad_sampling_settings_name_the_field(explorer, values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        explorer.sample(settings_from_page(*values))


def test_an_unreadable_upload_is_refused_with_a_message(explorer, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really an image")
    with pytest.raises(ValueError, match="broken.png is not an image"):
        explorer.reconstruct(bad)


def test_the_running_page_samples_and_reports_bad_input(runs, explorer, tmp_path):
    from gradio_client import Client, handle_file

    demo = build_app(explorer)
    assert demo.analytics_enabled is False
    fns = {f.api_name: f for f in demo.fns.values()}
    assert fns["generate"].concurrency_id == fns["reconstruct"].concurrency_id  # one model call at a time
    assert fns["generate"].concurrency_limit == 1
    port = free_port()
    launch(demo, "127.0.0.1", port)
    try:
        url = f"http://127.0.0.1:{port}/"
        import urllib.request

        css = urllib.request.urlopen(url + "theme.css", timeout=10).read().decode()
        assert "@import" not in css and "url(http" not in css and "googleapis" not in css  # no font from the internet
        client = Client(url, verbose=False)
        grid, command, _ = client.predict([3], 2, 1.5, 1.0, 0, 1.0, 7, api_name="/generate")
        assert "--classes 3 --per-class 2" in command and "--seed 7" in command
        expected = explorer.sample(SampleSettings(classes=(3,), per_class=2, seed=7))
        assert np.array_equal(pixels(grid), pixels(expected.path))
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"not an image")
        with pytest.raises(Exception, match="broken.png is not an image"):
            client.predict(handle_file(str(bad)), api_name="/reconstruct")
        with pytest.raises(Exception, match="pick at least one class"):
            client.predict([], 2, 1.5, 1.0, 0, 1.0, 7, api_name="/generate")
        photo = tmp_path / "photo.png"
        Image.fromarray((np.random.default_rng(2).random((32, 32, 3)) * 255).astype(np.uint8)).save(photo)
        edited, command, _ = client.predict(handle_file(str(photo)), "keep top", 4, 0, 0, 1, 1, False, [3, 4], 2, 1.5,
                                            1.0, 0, 1.0, 7, api_name="/edit")
        assert "--keep top:4 --classes 3,4 --num 2" in command
        from gear.edit import EditSettings, parse_region

        expected = explorer.edit(photo, EditSettings(region=parse_region(keep="top:4"), classes=(3, 4), per_class=2,
                                                     seed=7))
        assert np.array_equal(pixels(edited), pixels(expected.path))
        with pytest.raises(Exception, match="covers the whole token grid"):
            client.predict(handle_file(str(photo)), "inpaint", 4, 0, 0, 32, 32, False, [3], 1, 1.5, 1.0, 0, 1.0, 7,
                           api_name="/edit")
        summary, losses, *_ = client.predict(api_name="/curves")  # the page still answers after errors
        assert "ar/loss" in summary
    finally:
        demo.close()


def test_a_tokenizer_run_gets_no_sampling_tab(runs):
    explorer = RunExplorer(runs[0])
    assert explorer.kind == "tokenizer"
    demo = build_app(explorer)
    assert "generate" not in {d.api_name for d in demo.fns.values()}
    assert "reconstruct" in {d.api_name for d in demo.fns.values()}
    with pytest.raises(ValueError, match="has no generator"):
        explorer.sample(SampleSettings(classes=(0,)))


def test_a_text_run_samples_prompts_as_its_gear_sample_command_does(t2i_runs, tmp_path):
    from gradio_client import Client

    from gear.data.fmnist_captions import demo_prompts

    explorer = RunExplorer(t2i_runs[1], out_dir=tmp_path / "page")
    assert explorer.kind == "text" and "minilm-l6 text features (16 tokens)" in explorer.description()
    assert explorer.default_prompts() == demo_prompts()
    settings = prompt_settings_from_page("a small dark sneaker\n\n  a bright bag \n", 2, 3.0, 0.9, 20, 0.95, 4)
    assert settings.prompts == ("a small dark sneaker", "a bright bag")  # blank lines dropped, ends trimmed
    steps = []
    result = explorer.sample_prompts(settings, on_token=lambda done, total: steps.append((done, total)))
    assert steps == [(t, 64) for t in range(1, 65)] and result.num_images == 4
    argv = shlex.split(result.command)
    assert argv[3:7] == ["--prompt", "a small dark sneaker", "--prompt", "a bright bag"]
    argv[argv.index("--out") + 1] = str(tmp_path / "cli.png")
    assert main(argv[1:]) == 0
    assert np.array_equal(pixels(result.path), pixels(tmp_path / "cli.png"))

    with pytest.raises(ValueError, match="at least one prompt"):
        explorer.sample_prompts(prompt_settings_from_page(" \n\n", 2, 3.0, 1.0, 0, 1.0, 0))
    with pytest.raises(ValueError, match="more than the page draws at once"):
        explorer.sample_prompts(prompt_settings_from_page("\n".join(["a coat"] * 11), 16, 3.0, 1.0, 0, 1.0, 0))
    with pytest.raises(ValueError, match="not text-conditioned"):
        RunExplorer(t2i_runs[0]).sample_prompts(settings)
    with pytest.raises(ValueError, match="is text-conditioned: write prompts"):
        explorer.sample(SampleSettings(classes=(0,)))

    from gear.serve.app import edit_settings_from_page, region_from_page

    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(4).random((32, 32, 3)) * 255).astype(np.uint8)).save(photo)
    edit_settings = edit_settings_from_page(region_from_page("outpaint right", 3, 0, 0, 1, 1, False),
                                            "a long dark coat\na bright bag", 2, 3.0, 1.0, 0, 1.0, 1, text=True)
    edited = explorer.edit(photo, edit_settings)
    argv = shlex.split(edited.command)
    assert argv[4:10] == ["--outpaint", "right:3", "--prompt", "a long dark coat", "--prompt", "a bright bag"]
    argv[argv.index("--out") + 1] = str(tmp_path / "edit-cli.png")
    assert main(argv[1:]) == 0
    assert np.array_equal(pixels(edited.path), pixels(tmp_path / "edit-cli.png"))
    with pytest.raises(ValueError, match="text-conditioned: describe the result with prompts, not classes"):
        explorer.edit(photo, edit_settings_from_page(region_from_page("keep top", 4, 0, 0, 1, 1, False), [1], 1, 1.0,
                                                     1.0, 0, 1.0, 0, text=False))

    demo = build_app(explorer)
    port = free_port()
    launch(demo, "127.0.0.1", port)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        grid, command, _ = client.predict("a coat", 1, 1.5, 1.0, 0, 1.0, 3, api_name="/generate")
        assert "--prompt 'a coat' --per-class 1" in command
        expected = explorer.sample_prompts(PromptSettings(prompts=("a coat",), per_class=1, cfg_scale=1.5, seed=3))
        assert np.array_equal(pixels(grid), pixels(expected.path))
        with pytest.raises(Exception, match="at least one prompt"):
            client.predict("", 1, 1.5, 1.0, 0, 1.0, 3, api_name="/generate")
    finally:
        demo.close()


def test_cli_errors_are_one_line(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(runs[1] / "config.yaml", empty / "config.yaml")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match="another program holds the port"):
            check_port("127.0.0.1", port)
        assert main(["serve", str(runs[1]), "--port", str(port)]) == 2
    cases = [(empty, "holds no saved tokenizer"), (tmp_path / "missing", "config.yaml not found")]
    err = capsys.readouterr().err
    assert err.startswith("gear serve: error: cannot listen on 127.0.0.1:") and err.count("\n") == 1
    for run, message in cases:
        assert main(["serve", str(run), "--port", str(free_port())]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gear serve: error: ") and message in err and err.count("\n") == 1


def test_the_page_edit_grid_is_what_its_gear_edit_command_writes(explorer, tmp_path):
    from gear.serve.app import edit_settings_from_page, region_from_page

    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((36, 30, 3)) * 255).astype(np.uint8)).save(photo)
    region = region_from_page("inpaint", 4, 8, 10, 20, 24, False)
    assert region.args() == ["--inpaint", "8,10,20,24"]
    preview = explorer.edit_preview(photo, region)
    assert preview.kept.shape == (8, 8) and 0 < preview.kept.sum() < 64
    settings = edit_settings_from_page(region, [2, 5], 3, 2.0, 0.9, 40, 0.95, 8, text=False)
    steps = []
    result = explorer.edit(photo, settings, on_token=lambda done, total: steps.append(done))
    assert steps == list(range(1, 65)) and result.num_images == 6
    argv = shlex.split(result.command)
    assert argv[:6] == ["gear", "edit", explorer.run_dir, str(photo), "--inpaint", "8,10,20,24"]
    argv[argv.index("--out") + 1] = str(tmp_path / "cli.png")
    assert main(argv[1:]) == 0
    page, cli = pixels(result.path), pixels(tmp_path / "cli.png")
    assert page.shape == (2 * 34 + 2, 5 * 34 + 2, 3) and np.array_equal(page, cli)
    assert np.array_equal(page[2:34, 36:68], preview.mask)  # the mask tile is the preview's

    for kind, count in (("keep left", 3), ("outpaint down", 2)):
        r = explorer.edit(photo, edit_settings_from_page(region_from_page(kind, count, 0, 0, 1, 1, True), [1], 1, 1.5,
                                                         1.0, 0, 1.0, 0, text=False))
        argv = shlex.split(r.command)
        argv[argv.index("--out") + 1] = str(tmp_path / "cli2.png")
        assert "--prefix-only" in argv and main(argv[1:]) == 0
        assert np.array_equal(pixels(r.path), pixels(tmp_path / "cli2.png"))


def test_the_edit_tab_takes_an_image_of_the_sample_tab(explorer):
    fresh = RunExplorer(explorer.run_dir, out_dir=explorer.out_dir)
    with pytest.raises(ValueError, match="draw a grid on the Sample tab first"):
        fresh.pick_sample(1)
    sampled = fresh.sample(SampleSettings(classes=(3, 1), per_class=2, seed=5))
    picked = pixels(fresh.pick_sample(4))  # row 2, column 2
    assert picked.shape == (32, 32, 3) and np.array_equal(picked, pixels(sampled.path)[36:68, 36:68])
    with pytest.raises(ValueError, match="holds images 1..4, not 5"):
        fresh.pick_sample(5)


@pytest.mark.parametrize("host, refused", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                           ("0.0.0.0", True), ("192.0.2.7", True)])
def test_a_host_beyond_loopback_needs_a_login(host, refused, tmp_path):
    from gear.serve import check_login

    if refused:
        with pytest.raises(ValueError, match=f"--host {host} serves the page beyond this machine: pass --auth-file"):
            check_login(host, None, False)
        assert check_login(host, None, True) is None  # --no-auth said explicitly
    else:
        assert check_login(host, None, False) is None
    logins = tmp_path / "logins"
    logins.write_text("# who may use the page\nann:s3cret:with colon\n\nbob:pw\n")
    assert check_login(host, str(logins), False) == [("ann", "s3cret:with colon"), ("bob", "pw")]
    with pytest.raises(ValueError, match="contradict"):
        check_login(host, str(logins), True)


def test_serve_refuses_an_open_host_and_a_bad_auth_file_in_one_line(runs, tmp_path, capsys):
    port = str(free_port())
    assert main(["serve", str(runs[1]), "--host", "0.0.0.0", "--port", port]) == 2
    err = capsys.readouterr().err
    assert err == ("gear serve: error: --host 0.0.0.0 serves the page beyond this machine: pass --auth-file FILE "
                   "(user:password lines) to require a login, or --no-auth to let anyone who reaches the port use it\n")
    bad = tmp_path / "logins"
    bad.write_text("ann\n")
    for argv, message in (([ "--auth-file", str(bad)], "line 1: write user:password"),
                          (["--auth-file", str(tmp_path / "none")], "no such file")):
        assert main(["serve", str(runs[1]), "--host", "0.0.0.0", "--port", port, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gear serve: error: --auth-file") and message in err and err.count("\n") == 1


def test_with_a_login_a_request_without_it_gets_no_model_call(explorer, monkeypatch):
    import urllib.error
    import urllib.request

    from gradio_client import Client

    calls = []
    generate = explorer.gen.generate
    monkeypatch.setattr(explorer.gen, "generate", lambda *a, **kw: calls.append(1) or generate(*a, **kw))
    demo = build_app(explorer)
    port = free_port()
    launch(demo, "127.0.0.1", port, auth=[("ann", "s3cret")])
    try:
        url = f"http://127.0.0.1:{port}/"
        body = json.dumps({"data": [[3], 1, 1.5, 1.0, 0, 1.0, 7]}).encode()
        request = urllib.request.Request(url + "gradio_api/call/generate", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        with pytest.raises(Exception):
            Client(url, verbose=False, auth=("ann", "wrong"))
        assert calls == []
        grid, command, _ = Client(url, verbose=False, auth=("ann", "s3cret")).predict([3], 1, 1.5, 1.0, 0, 1.0, 7,
                                                                                     api_name="/generate")
        assert calls == [1] and "--classes 3" in command
    finally:
        demo.close()
