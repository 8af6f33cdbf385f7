"""The Gradio page over a RunExplorer: Sample, Edit, Reconstruct and Curves tabs.

Offline by construction: analytics off (environment and Blocks), a theme whose fonts are system fonts (nothing
from a font CDN), share links off. Requests that touch the models share one queue slot (CPU: one at a time).
"""

from __future__ import annotations

import html
import math
import os
import warnings

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at import: no telemetry, no version check

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402  (installed with gradio)

from gear.edit import EditSettings, Region, parse_region  # noqa: E402
from gear.sample import DEFAULT_PER_CLASS, SampleSettings  # noqa: E402
from gear.serve.curves import PANEL_TITLES, Panel  # noqa: E402
from gear.serve.explorer import MAX_IMAGES, EditPreview, Reconstruction, RunExplorer  # noqa: E402
from gear.text.grid import PromptSettings  # noqa: E402

# gradio's queue statistics call pandas with options pandas 3 deprecates: two console lines per request, none of
# them about this page.
warnings.filterwarnings("ignore", message="'future.no_silent_downcasting' is deprecated")
warnings.filterwarnings("ignore", message="The copy keyword is deprecated")

MODELS = "models"  # concurrency id shared by every event that runs the tokenizer or the generator
REFRESH_SECONDS = 30  # the curves reload themselves while a run is still training
CSS = """
.pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
.token-map { display: grid; gap: 1px; width: max-content; font: 11px ui-monospace, monospace; }
.token-map span { display: flex; align-items: center; justify-content: center; color: #111; }
.token-map span.generated { background: repeating-linear-gradient(45deg, #ddd, #ddd 3px, #bbb 3px, #bbb 6px); color: #555; }
"""
REGIONS = ("keep top", "keep left", "inpaint", "outpaint down", "outpaint right")


def theme() -> gr.themes.Base:
    """The default look with system fonts only: no font file is requested from anywhere."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def _whole(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def settings_from_page(classes, per_class, cfg_scale, temperature, top_k, top_p, seed) -> SampleSettings:
    """The page's raw values (None, floats from sliders, ...) as SampleSettings, or ValueError naming the field."""
    return SampleSettings(
        classes=tuple(_whole(c, "a class") for c in (classes or ())),
        per_class=_whole(per_class, "samples per class"),
        cfg_scale=_real(cfg_scale, "CFG scale"),
        temperature=_real(temperature, "temperature"),
        top_k=_whole(top_k, "top-k"),
        top_p=_real(top_p, "top-p"),
        seed=_whole(seed, "seed"),
    )


def prompt_settings_from_page(prompts, per_prompt, cfg_scale, temperature, top_k, top_p, seed) -> PromptSettings:
    """The prompt box (one caption per line; blank lines ignored) and the sliders as PromptSettings."""
    lines = tuple(line.strip() for line in str(prompts or "").splitlines() if line.strip())
    return PromptSettings(prompts=lines, per_class=_whole(per_prompt, "samples per prompt"),
                          cfg_scale=_real(cfg_scale, "CFG scale"), temperature=_real(temperature, "temperature"),
                          top_k=_whole(top_k, "top-k"), top_p=_real(top_p, "top-p"), seed=_whole(seed, "seed"))


def token_map_html(r: Reconstruction | EditPreview) -> str:
    """The code indices as a grid of coloured cells, one colour per code; on an edit preview, the cells to be
    generated are hatched grey and marked "?"."""
    h, w = r.indices.shape
    kept = getattr(r, "kept", np.ones((h, w), dtype=bool)).reshape(-1).tolist()
    cell = max(14, min(32, 264 // w))
    cells = "".join(
        f'<span style="background: rgb({c[0]}, {c[1]}, {c[2]}); width: {cell}px; height: {cell}px" '
        f'title="row {i // w}, column {i % w}: code {code}">{code}</span>' if keep else
        f'<span class="generated" style="width: {cell}px; height: {cell}px" '
        f'title="row {i // w}, column {i % w}: generated">?</span>'
        for i, (code, c, keep) in enumerate(zip(r.indices.reshape(-1).tolist(), r.colours.reshape(-1, 3).tolist(), kept))
    )
    label = f"{sum(kept)} of {h * w} codes kept" if not all(kept) else f"{h}x{w} codes"
    return (f'<div class="token-map" style="grid-template-columns: repeat({w}, {cell}px)" '
            f'aria-label="token map, {label}">{cells}</div>')


def region_from_page(kind, count, x0, y0, x1, y1, prefix_only) -> Region:
    """The region controls as a Region (`gear edit`'s own parser), or ValueError naming what is wrong."""
    if kind not in REGIONS:
        raise ValueError(f"choose a region: one of {', '.join(REGIONS)}")
    mode, side = kind.split(" ") if " " in kind else (kind, "")
    if mode == "inpaint":
        box = ",".join(str(_whole(v, "a rectangle corner")) for v in (x0, y0, x1, y1))
        return parse_region(inpaint=box, prefix_only=bool(prefix_only))
    spec = f"{side}:{_whole(count, 'token rows / columns')}"
    return parse_region(**{mode: spec}, prefix_only=bool(prefix_only))


def edit_settings_from_page(region: Region, condition, num, cfg_scale, temperature, top_k, top_p, seed,
                            text: bool) -> EditSettings:
    """The Edit tab's condition (classes, or prompts one per line) and sliders as EditSettings."""
    if text:
        classes, prompts = (), tuple(line.strip() for line in str(condition or "").splitlines() if line.strip())
    else:
        classes, prompts = tuple(_whole(c, "a class") for c in (condition or ())), ()
    return EditSettings(region=region, classes=classes, prompts=prompts, per_class=_whole(num, "variants"),
                        cfg_scale=_real(cfg_scale, "CFG scale"), temperature=_real(temperature, "temperature"),
                        top_k=_whole(top_k, "top-k"), top_p=_real(top_p, "top-p"), seed=_whole(seed, "seed"))


def summary_markdown(explorer: RunExplorer) -> str:
    summary = explorer.summary()
    if not summary:
        return "No `summary.json` yet: the run has not finished a stage."
    rows = [f"| {html.escape(str(k))} | {v:.4g} |" if isinstance(v, float) else f"| {html.escape(str(k))} | {v} |"
            for k, v in summary.items()]
    return "| summary.json | last value |\n|---|---|\n" + "\n".join(rows)


def _panel_update(panel: Panel):
    frame = pd.DataFrame(panel.rows, columns=["step", "value", "metric"])
    return gr.LinePlot(value=frame, visible=bool(panel.rows))


def build_app(explorer: RunExplorer) -> gr.Blocks:
    with gr.Blocks(title=f"gear: {explorer.run_dir}", analytics_enabled=False) as demo:
        gr.Markdown(f"## gear · `{explorer.run_dir}`\n{explorer.description()}")
        with gr.Tabs():
            if explorer.kind != "tokenizer":
                _sample_tab(explorer)
                _edit_tab(explorer)
            _reconstruct_tab(explorer)
            _curves_tab(explorer, demo)
    demo.queue(default_concurrency_limit=1)
    return demo


def sampling_controls(explorer: RunExplorer, prefix: str = "") -> tuple:
    """The sampler's widgets the Sample and Edit tabs share: CFG scale, temperature, top-k, top-p, seed."""
    cfg_scale = gr.Slider(0, 10, value=SampleSettings.cfg_scale, step=0.1, label="CFG scale (1 = no guidance)",
                          elem_id=f"{prefix}cfg-scale")
    temperature = gr.Slider(0.05, 2, value=1.0, step=0.05, label="Temperature", elem_id=f"{prefix}temperature")
    top_k = gr.Slider(0, explorer.gen.config.vocab_size, value=0, step=1, label="Top-k (0 = off)",
                      elem_id=f"{prefix}top-k")
    top_p = gr.Slider(0.01, 1, value=1.0, step=0.01, label="Top-p (1 = off)", elem_id=f"{prefix}top-p")
    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id=f"{prefix}seed")
    return cfg_scale, temperature, top_k, top_p, seed


def _sample_tab(explorer: RunExplorer) -> None:
    """Class picker or prompt box (by the run's kind), the sampling sliders, the grid and its `gear sample` line."""
    text = explorer.kind == "text"
    with gr.Tab("Sample", id="sample"):
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                if text:
                    condition = gr.Textbox(value="\n".join(explorer.default_prompts()), lines=6, max_lines=16,
                                           label="Prompts (one per line, one row each)", elem_id="prompts")
                else:
                    choices = explorer.class_choices()
                    condition = gr.Dropdown(choices=choices, value=[i for _, i in choices[:10]], multiselect=True,
                                            label="Classes (one row each)", elem_id="classes")
                per_row = gr.Slider(1, 16, value=DEFAULT_PER_CLASS, step=1,
                                    label="Samples per prompt" if text else "Samples per class", elem_id="per-class")
                cfg_scale, temperature, top_k, top_p, seed = sampling_controls(explorer)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Markdown(f"At most {MAX_IMAGES} images per grid; `gear sample` draws any number.")
            with gr.Column(scale=2):
                grid = gr.Image(label="Samples (EMA weights)", type="filepath", format="png", interactive=False,
                                elem_id="grid", elem_classes=["pixelated"], height=480)
                command = gr.Textbox(label="The same grid from the command line", interactive=False, buttons=["copy"],
                                     elem_id="command")
                download = gr.DownloadButton("Download grid PNG", visible=False, elem_id="download")

    def generate(condition, per_row, cfg_scale, temperature, top_k, top_p, seed, progress=gr.Progress()):
        def on_token(done: int, total: int) -> None:
            progress((done, total), desc="Sampling tokens", unit="tokens")

        values = (condition, per_row, cfg_scale, temperature, top_k, top_p, seed)
        try:
            if text:
                result = explorer.sample_prompts(prompt_settings_from_page(*values), on_token)
            else:
                result = explorer.sample(settings_from_page(*values), on_token)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return str(result.path), result.command, gr.DownloadButton(value=str(result.path), visible=True)

    button.click(generate, [condition, per_row, cfg_scale, temperature, top_k, top_p, seed], [grid, command, download],
                 api_name="generate", concurrency_id=MODELS, concurrency_limit=1)


def _edit_tab(explorer: RunExplorer) -> None:
    """An image (uploaded, or one of the Sample tab's), a region, classes or prompts: the `gear edit` grid."""
    text = explorer.kind == "text"
    grid_size = explorer.gen.config.grid_size
    size = explorer.image_size
    with gr.Tab("Edit", id="edit"):
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = gr.File(label="An image to edit (PNG, JPEG, WebP, ...)", file_types=["image"], type="filepath",
                                 elem_id="edit-upload")
                with gr.Row():
                    number = gr.Number(value=1, precision=0, minimum=1, label="Sample #", elem_id="edit-sample-number",
                                       min_width=80)
                    use_sample = gr.Button("Use this image of the Sample tab", size="sm", elem_id="edit-use-sample")
                kind = gr.Radio(list(REGIONS), value="keep top", label="Region", elem_id="edit-region")
                count = gr.Slider(1, grid_size - 1, value=grid_size // 2, step=1,
                                  label="Token rows / columns kept (keep) or added (outpaint)", elem_id="edit-count")
                gr.Markdown("Inpaint: the rectangle to generate, in pixels of the input image")
                corners = []
                for pair in ((("X0", size // 4), ("Y0", size // 4)), (("X1", 3 * size // 4), ("Y1", 3 * size // 4))):
                    with gr.Row():
                        corners += [gr.Slider(0, size, value=v, step=1, label=name, elem_id=f"edit-{name.lower()}",
                                              min_width=120) for name, v in pair]
                prefix_only = gr.Checkbox(False, label="Prefix only: also resample the kept tokens after the first "
                                          "generated one (raster order never sees them)", elem_id="edit-prefix-only")
                if text:
                    condition = gr.Textbox(value="\n".join(explorer.default_prompts()[:2]), lines=3, max_lines=8,
                                           label="Prompts (one per line, one row each)", elem_id="edit-prompts")
                else:
                    choices = explorer.class_choices()
                    condition = gr.Dropdown(choices=choices, value=[i for _, i in choices[:2]], multiselect=True,
                                            label="Classes (one row each)", elem_id="edit-classes")
                num = gr.Slider(1, 16, value=DEFAULT_PER_CLASS, step=1, label="Variants per row", elem_id="edit-num")
                cfg_scale, temperature, top_k, top_p, seed = sampling_controls(explorer, "edit-")
                button = gr.Button("Edit", variant="primary", elem_id="edit-generate")
            with gr.Column(scale=2):
                with gr.Row():
                    mask = gr.Image(label="Kept (grey: generated)", interactive=False, format="png", height=220,
                                    elem_classes=["pixelated"], elem_id="edit-mask")
                    with gr.Column():
                        gr.Markdown("Kept tokens over the token map (?: generated)")
                        token_map = gr.HTML(elem_id="edit-token-map")
                message = gr.Markdown(elem_id="edit-message")
                grid = gr.Image(label="Input | kept | variants, a row per " + ("prompt" if text else "class"),
                                type="filepath", format="png", interactive=False, elem_id="edit-grid",
                                elem_classes=["pixelated"], height=420)
                command = gr.Textbox(label="The same grid from the command line", interactive=False, buttons=["copy"],
                                     elem_id="edit-command")
                download = gr.DownloadButton("Download grid PNG", visible=False, elem_id="edit-download")

    region_inputs = [kind, count, *corners, prefix_only]

    def preview(path, *region_values):
        """The mask tile and token map of the region, or a line saying what is wrong with it (no popup per slider)."""
        if not path:
            return None, "", "Upload an image, or take one from the Sample tab."
        try:
            p = explorer.edit_preview(path, region_from_page(*region_values))
        except ValueError as err:
            return None, "", f"**{html.escape(str(err))}**"
        return p.mask, token_map_html(p), f"{int(p.kept.sum())} of {p.kept.size} tokens kept"

    def uploaded(path, *region_values):
        """A new image: the rectangle sliders span its pixels (the rectangle is in pixels of the input image)."""
        if not path:
            return *(gr.Slider() for _ in corners), *preview(path, *region_values)
        try:
            w, h = explorer.image_size_of(path)
        except ValueError as err:
            return *(gr.Slider() for _ in corners), None, "", f"**{html.escape(str(err))}**"
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        sliders = [gr.Slider(maximum=limit, value=v) for limit, v in zip((w, h, w, h), box)]
        kind_value, count_value, *_, prefix_value = region_values
        return *sliders, *preview(path, kind_value, count_value, *box, prefix_value)

    def take_sample(value):
        try:
            return str(explorer.pick_sample(_whole(value, "the sample number")))
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None

    def run_edit(path, *values, progress=gr.Progress()):
        def on_token(done: int, total: int) -> None:
            progress((done, total), desc="Sampling tokens", unit="tokens")

        if not path:
            raise gr.Error("upload an image first, or take one from the Sample tab", print_exception=False)
        try:
            region = region_from_page(*values[: len(region_inputs)])
            settings = edit_settings_from_page(region, *values[len(region_inputs):], text=text)
            result = explorer.edit(path, settings, on_token)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return str(result.path), result.command, gr.DownloadButton(value=str(result.path), visible=True)

    previews = [mask, token_map, message]
    upload.upload(uploaded, [upload, *region_inputs], [*corners, *previews], api_visibility="private",
                  concurrency_id=MODELS, concurrency_limit=1)
    use_sample.click(take_sample, number, upload, api_visibility="private").then(
        uploaded, [upload, *region_inputs], [*corners, *previews], api_visibility="private", concurrency_id=MODELS,
        concurrency_limit=1)
    gr.on([c.release for c in (count, *corners)] + [kind.change, prefix_only.change], preview,
          [upload, *region_inputs], previews, api_name="edit_preview", concurrency_id=MODELS, concurrency_limit=1)
    button.click(run_edit, [upload, *region_inputs, condition, num, cfg_scale, temperature, top_k, top_p, seed],
                 [grid, command, download], api_name="edit", concurrency_id=MODELS, concurrency_limit=1)


def _reconstruct_tab(explorer: RunExplorer) -> None:
    with gr.Tab("Reconstruct", id="reconstruct"):
        with gr.Row():
            with gr.Column(scale=1, min_width=240):
                upload = gr.File(label="An image (PNG, JPEG, WebP, ...)", file_types=["image"], type="filepath",
                                 elem_id="upload")
                button = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct")
                psnr = gr.Markdown(elem_id="psnr")
            original = gr.Image(label=f"Input ({explorer.image_size} px centre crop)", interactive=False, format="png",
                                elem_classes=["pixelated"], height=300, elem_id="original")
            recon = gr.Image(label="Reconstruction", interactive=False, format="png", elem_classes=["pixelated"],
                             height=300, elem_id="reconstruction")
            with gr.Column(scale=1, min_width=300):
                gr.Markdown("Token map: the code index of each token")
                token_map = gr.HTML(elem_id="token-map")

    def reconstruct(path):
        if not path:
            raise gr.Error("upload an image first", print_exception=False)
        try:
            r = explorer.reconstruct(path)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
        h, w = r.indices.shape
        text = f"**PSNR {r.psnr:.2f} dB** · {h}x{w} tokens, {len(np.unique(r.indices))} distinct codes"
        return r.original, r.reconstruction, token_map_html(r), text

    outputs = [original, recon, token_map, psnr]
    button.click(reconstruct, upload, outputs, api_name="reconstruct", concurrency_id=MODELS, concurrency_limit=1)
    upload.upload(reconstruct, upload, outputs, api_visibility="private", concurrency_id=MODELS, concurrency_limit=1)


def _curves_tab(explorer: RunExplorer, demo: gr.Blocks) -> None:
    with gr.Tab("Curves", id="curves"):
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                summary = gr.Markdown(elem_id="summary")
                reload = gr.Button("Reload", size="sm", elem_id="reload")
            with gr.Column(scale=3):
                plots = []
                for start in range(0, len(PANEL_TITLES), 2):  # two plots a row
                    with gr.Row():
                        plots += [gr.LinePlot(x="step", y="value", color="metric", title=title, height=260, visible=False,
                                              elem_id="plot-" + title.lower().replace(" ", "-"))
                                  for title in PANEL_TITLES[start : start + 2]]
        timer = gr.Timer(REFRESH_SECONDS)

    def refresh():
        return [summary_markdown(explorer), *(_panel_update(p) for p in explorer.curves())]

    outputs = [summary, *plots]
    demo.load(refresh, None, outputs, api_name="curves")
    reload.click(refresh, None, outputs, api_visibility="private")
    timer.tick(refresh, None, outputs, api_visibility="private", show_progress="hidden")


def launch(demo: gr.Blocks, host: str, port: int, auth: list[tuple[str, str]] | None = None) -> None:
    """Start serving on host:port in the background (no share link, errors shown on the page); demo.close() stops.
    ``auth``: (user, password) pairs, checked by Gradio's login page before anything else is served."""
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
                prevent_thread_lock=True, quiet=True, theme=theme(), css=CSS, footer_links=["api", "settings"],
                auth=auth or None, auth_message="gear serve: log in with a user:password line of the --auth-file")
