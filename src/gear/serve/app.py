"""The Gradio page over a RunExplorer: Sample, Reconstruct and Curves tabs.

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

from gear.sample import DEFAULT_PER_CLASS, SampleSettings  # noqa: E402
from gear.serve.curves import PANEL_TITLES, Panel  # noqa: E402
from gear.serve.explorer import MAX_IMAGES, Reconstruction, RunExplorer  # noqa: E402
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
"""


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


def token_map_html(r: Reconstruction) -> str:
    """The code indices as a grid of coloured cells, one colour per code."""
    h, w = r.indices.shape
    cell = max(14, min(32, 264 // w))
    cells = "".join(
        f'<span style="background: rgb({c[0]}, {c[1]}, {c[2]}); width: {cell}px; height: {cell}px" '
        f'title="row {i // w}, column {i % w}: code {code}">{code}</span>'
        for i, (code, c) in enumerate(zip(r.indices.reshape(-1).tolist(), r.colours.reshape(-1, 3).tolist()))
    )
    return (f'<div class="token-map" style="grid-template-columns: repeat({w}, {cell}px)" '
            f'aria-label="token map, {h}x{w} codes">{cells}</div>')


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
            _reconstruct_tab(explorer)
            _curves_tab(explorer, demo)
    demo.queue(default_concurrency_limit=1)
    return demo


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
                cfg_scale = gr.Slider(0, 10, value=SampleSettings.cfg_scale, step=0.1, label="CFG scale (1 = no guidance)",
                                      elem_id="cfg-scale")
                temperature = gr.Slider(0.05, 2, value=1.0, step=0.05, label="Temperature", elem_id="temperature")
                top_k = gr.Slider(0, explorer.gen.config.vocab_size, value=0, step=1, label="Top-k (0 = off)",
                                  elem_id="top-k")
                top_p = gr.Slider(0.01, 1, value=1.0, step=0.01, label="Top-p (1 = off)", elem_id="top-p")
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
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


def launch(demo: gr.Blocks, host: str, port: int) -> None:
    """Start serving on host:port in the background (no share link, errors shown on the page); demo.close() stops."""
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
                prevent_thread_lock=True, quiet=True, theme=theme(), css=CSS, footer_links=["api", "settings"])
