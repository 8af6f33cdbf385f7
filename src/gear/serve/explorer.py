"""What the page shows, without the page: a run's models loaded once, sample grids (the `gear sample` path), edits
(the `gear edit` path), reconstructions with their token map and PSNR, the curves of metrics.jsonl and the run's
summary.

gear.serve.app puts this on a Gradio page; everything here is plain Python and testable without a browser.
"""

from __future__ import annotations

import colorsys
import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gear.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from gear.data.fmnist_captions import demo_prompts
from gear.data.image_folder import load_rgb
from gear.data.transforms import square_view, to_uint8_image
from gear.edit import EditSettings, Region, edit, plan_edit, read_image, save_edit_grid
from gear.eval.image_metrics import psnr
from gear.run import open_run
from gear.sample import SampleSettings, sample_grid
from gear.serve.curves import Panel, curve_panels
from gear.text.grid import PromptSettings, sample_prompt_grid
from gear.text.pipeline import TextToImage, load_text_to_image

MAX_IMAGES = 160  # per grid on the page; `gear sample` draws larger ones
GOLDEN = 0.6180339887498949


@dataclass
class SampleResult:
    path: Path  # the PNG grid, one row per class or prompt, as `gear sample` (or `gear edit`) writes it
    command: str  # the `gear sample` (`gear edit`) line that writes the same grid
    num_images: int
    per_row: int = 0  # images in a row (for picking one of them)


@dataclass
class EditPreview:
    original: np.ndarray  # uint8 (S, S, 3): the input as the tokenizer sees it
    mask: np.ndarray  # uint8 (S, S, 3): the kept part where it is kept, grey where tokens are generated
    indices: np.ndarray  # int64 (h, w): the kept tokens where they are kept (other cells are generated)
    colours: np.ndarray  # uint8 (h, w, 3)
    kept: np.ndarray  # bool (h, w)


@dataclass
class Reconstruction:
    original: np.ndarray  # uint8 (S, S, 3): the centre crop the tokenizer saw
    reconstruction: np.ndarray  # uint8 (S, S, 3)
    indices: np.ndarray  # int64 (h, w) code indices
    colours: np.ndarray  # uint8 (h, w, 3): one fixed colour per code
    psnr: float  # dB between the two uint8 images (as `gear eval recon` measures it)


def code_colours(indices: np.ndarray) -> np.ndarray:
    """A fixed, well-spread colour per code index (golden-ratio hues, two lightness levels): (..., 3) uint8."""
    flat = np.asarray(indices).reshape(-1)
    table = {}
    for code in np.unique(flat).tolist():
        hue = (code * GOLDEN) % 1.0
        value = 0.95 if code % 2 == 0 else 0.75
        table[code] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.6, value)]
    return np.array([table[c] for c in flat.tolist()], dtype=np.uint8).reshape(*np.shape(indices), 3)


class RunExplorer:
    """A run directory's EMA models on one device, and what the page asks of them."""

    def __init__(self, run_dir: str | Path, device: str = "cpu", out_dir: str | Path | None = None):
        self.run_dir = str(run_dir)  # as the user wrote it: it goes into the `gear sample` command
        self.run = open_run(run_dir)
        self.config = self.run.config
        self.kind = self.run.kind  # what the page offers: reconstruction and curves only, a class picker or a prompt box
        self.pipe: TextToImage | None = None
        if self.kind == "text":  # the tokenizer and generator come with the run's text encoder
            self.pipe = load_text_to_image(self.run, device=device)
            self.tok, self.gen = self.pipe.tokenizer, self.pipe.generator
        else:
            self.tok, self.gen = self.run.load_pair(device=device)
        self.image_size = self.config.data.image_size
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="gear-serve-"))
        self._names = itertools.count()
        self.last_sample: SampleResult | None = None  # the Sample tab's latest grid, for the Edit tab to pick from

    # ------------------------------------------------------------------ sampling

    @property
    def num_classes(self) -> int:
        return self.gen.config.num_classes if self.gen is not None else 0

    def class_choices(self) -> list[tuple[str, int]]:
        """(label, class id) for the class picker; Fashion-MNIST classes are named."""
        names = FASHION_MNIST_CLASSES if self.config.data.name == "fashion-mnist" else ()
        return [(f"{i}: {names[i]}" if i < len(names) else str(i), i) for i in range(self.num_classes)]

    def sample(self, settings: SampleSettings, on_token=None) -> SampleResult:
        if self.gen is None:
            raise ValueError(f"{self.run_dir} has no generator (a tokenizer run): sample from a joint or ar run")
        if self.pipe is not None:
            raise ValueError(f"{self.run_dir} is text-conditioned: write prompts instead of picking classes")
        if not settings.classes:
            raise ValueError("pick at least one class")
        settings.check(self.gen)
        n = len(settings.classes) * settings.per_class
        if n > MAX_IMAGES:
            raise ValueError(f"{n} images is more than the page draws at once ({MAX_IMAGES}); "
                             "pick fewer classes or samples per class, or use the `gear sample` command")
        path = sample_grid(self.tok, self.gen, settings, self.out_dir / f"samples-{next(self._names)}.png", on_token)
        self.last_sample = SampleResult(path, settings.command(self.run_dir), n, settings.per_class)
        return self.last_sample

    def default_prompts(self) -> list[str]:
        """Prompts to start from: one held-out caption per class on captioned Fashion-MNIST, else none."""
        return demo_prompts() if self.config.data.name == "fashion-mnist-captions" else []

    def sample_prompts(self, settings: PromptSettings, on_token=None) -> SampleResult:
        if self.pipe is None:
            raise ValueError(f"{self.run_dir} is not text-conditioned: pick classes instead of prompts")
        settings.check(self.gen.config.vocab_size)
        n = len(settings.prompts) * settings.per_class
        if n > MAX_IMAGES:
            raise ValueError(f"{n} images is more than the page draws at once ({MAX_IMAGES}); "
                             "write fewer prompts or samples per prompt, or use the `gear sample` command")
        path = sample_prompt_grid(self.pipe, settings, self.out_dir / f"samples-{next(self._names)}.png", on_token)
        self.last_sample = SampleResult(path, settings.command(self.run_dir), n, settings.per_class)
        return self.last_sample

    # ------------------------------------------------------------------ editing

    def pick_sample(self, number: int) -> Path:
        """Image ``number`` (1-based, row by row) of the Sample tab's latest grid, written as a PNG of its own."""
        last = self.last_sample
        if last is None:
            raise ValueError("draw a grid on the Sample tab first, or upload an image")
        if not 1 <= number <= last.num_images:
            raise ValueError(f"the Sample tab's grid holds images 1..{last.num_images}, not {number}")
        grid = np.asarray(Image.open(last.path).convert("RGB"))
        # the layouts of save_image_grid (padding 2, 1x) and save_prompt_grid (padding 4, 2x)
        pad, scale = (4, 2) if self.pipe is not None else (2, 1)
        cell = self.image_size * scale
        row, col = divmod(number - 1, last.per_row)
        top, left = pad + row * (cell + pad), pad + col * (cell + pad)
        tile = grid[top : top + cell : scale, left : left + cell : scale]
        path = self.out_dir / f"sample-{next(self._names)}-{number}.png"
        Image.fromarray(np.ascontiguousarray(tile)).save(path)
        return path

    def image_size_of(self, image_path: str | Path) -> tuple[int, int]:
        """(width, height) in pixels of an image file; ValueError when it does not decode."""
        return read_image(image_path).size

    def edit_preview(self, image_path: str | Path, region: Region) -> EditPreview:
        """What ``region`` keeps of the image, without sampling: the mask tile and the kept tokens."""
        self._check_editable()
        plan = plan_edit(image_path, self.tok, self.gen.config.grid_size, region)
        codes, kept = plan.known.tokens.numpy(), plan.known.mask.numpy()
        return EditPreview(original=to_uint8_image(plan.original).permute(1, 2, 0).numpy(),
                           mask=to_uint8_image(plan.canvas).permute(1, 2, 0).numpy(), indices=codes,
                           colours=code_colours(codes), kept=kept)

    def edit(self, image_path: str | Path, settings: EditSettings, on_token=None) -> SampleResult:
        """The `gear edit` grid of the image (a row per class or prompt: input, mask, variants) and its command."""
        self._check_editable()
        settings.check(self.gen)
        n = settings.rows * settings.per_class
        if n > MAX_IMAGES:
            raise ValueError(f"{n} images is more than the page draws at once ({MAX_IMAGES}); "
                             "choose fewer rows or variants, or use the `gear edit` command")
        result = edit(image_path, self.tok, self.pipe or self.gen, settings, on_token)
        path = save_edit_grid(result, self.out_dir / f"edit-{next(self._names)}.png")
        return SampleResult(path, settings.command(self.run_dir, str(image_path)), n, settings.per_class + 2)

    def _check_editable(self) -> None:
        if self.gen is None:
            raise ValueError(f"{self.run_dir} has no generator (a tokenizer run): edit with a joint or ar run")

    # ------------------------------------------------------------------ reconstruction

    @torch.no_grad()
    def reconstruct(self, image_path: str | Path) -> Reconstruction:
        """Encode and decode one image file as `gear reconstruct` does (short-side resize, centre crop)."""
        device = next(self.tok.parameters()).device
        try:
            pil = load_rgb(Path(image_path))
        except ValueError:
            raise ValueError(f"{Path(image_path).name} is not an image this page can read: "
                             "upload a PNG, JPEG, WebP, BMP or GIF file") from None
        image = square_view(pil, self.image_size).unsqueeze(0).to(device)
        indices = self.tok.encode(image)
        original, recon = to_uint8_image(image.cpu()), to_uint8_image(self.tok.decode(indices).float().cpu())
        codes = indices[0].cpu().numpy()
        return Reconstruction(original=original[0].permute(1, 2, 0).numpy(), reconstruction=recon[0].permute(1, 2, 0).numpy(),
                              indices=codes, colours=code_colours(codes), psnr=psnr(original, recon, data_range=255))

    # ------------------------------------------------------------------ curves and summary

    def curves(self) -> list[Panel]:
        return curve_panels(self.run.metrics())

    def summary(self) -> dict:
        """summary.json of the run ({} while the run has not finished a stage)."""
        return self.run.summary()

    def description(self) -> str:
        """One line on the models: tokenizer codebook and grid, generator size and classes."""
        t = self.tok.config
        grid = self.image_size // self.tok.downsample
        text = (f"{self.config.data.name} {self.image_size} px; tokenizer {t.quantizer.upper()} {t.codebook_size} codes, "
                f"{grid}x{grid} tokens")
        if self.gen is not None:
            g = self.gen.config
            text += f"; generator {g.n_layer} layers x {g.dim}, {self.gen.num_params() / 1e6:.1f}M parameters, "
            if self.pipe is not None:
                text += f"conditioned on {self.pipe.encoder.name} text features ({g.text_len} tokens)"
            else:
                text += f"{g.num_classes} classes"
        return text
