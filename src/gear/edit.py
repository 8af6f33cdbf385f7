"""Editing an image with the AR: keep part of its token grid and sample the rest (completion, inpainting,
outpainting). The one path that `gear edit`, the page's Edit tab and users take.

    region = parse_region(keep="top:50%")                 # or inpaint="4,4,20,20", outpaint="down:2"
    settings = EditSettings(region=region, classes=(3, 7), per_class=8, cfg_scale=1.5, seed=0)
    result = edit("coat.png", tok, gen, settings)          # gen: a class-conditional GPT, or a TextToImage pipeline
    save_edit_grid(result, "edit.png")                     # a row per class or prompt: input | mask | variants

The image is seen as the tokenizer sees it (short side resized, centre crop) and encoded; the kept tokens are forced
and the others sampled in raster order with the sampler's guidance, temperature, filters and seed
(gear.models.sampling.KnownTokens). Raster order means a sampled token sees the kept tokens before it, never those
after it: the right half of a row, or the part under an inpainted rectangle, is drawn without looking at what it
must join. ``prefix_only`` is the honest alternative: keep only the tokens before the first generated one and
resample everything after it.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from gear.data.image_folder import load_rgb
from gear.data.transforms import resize_short_side, save_image_grid, square_view
from gear.models.autoencoder import Tokenizer
from gear.models.gpt import GPT
from gear.models.sampling import KnownTokens
from gear.sample import Sampling
from gear.text.grid import save_prompt_grid

if TYPE_CHECKING:
    from gear.text.pipeline import TextToImage

KEEP_SIDES = ("top", "left")
OUTPAINT_SIDES = ("down", "right")
MASK_GREY = 0.0  # the generated part of the mask tile, in [-1, 1]: mid grey


@dataclass(frozen=True)
class Region:
    """What of the image is kept. ``mode``: keep (the top rows or left columns), inpaint (all but a rectangle) or
    outpaint (the image shifted up or left by ``count`` token rows/columns, the uncovered part generated)."""

    mode: str                                   # keep | inpaint | outpaint
    side: str = ""                              # keep: top | left; outpaint: down | right
    count: int = 0                              # keep: token rows/columns kept; outpaint: added
    percent: bool = False                       # keep: count is a percentage of the rows/columns
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # inpaint: X0, Y0, X1, Y1, pixels of the input image (X1, Y1 excluded)
    prefix_only: bool = False                   # keep only the tokens before the first generated one (raster order)

    def args(self) -> list[str]:
        """The `gear edit` options for this region."""
        if self.mode == "keep":
            out = ["--keep", f"{self.side}:{self.count}{'%' if self.percent else ''}"]
        elif self.mode == "outpaint":
            out = ["--outpaint", f"{self.side}:{self.count}"]
        else:
            out = ["--inpaint", ",".join(map(str, self.box))]
        return out + (["--prefix-only"] if self.prefix_only else [])

    def describe(self) -> str:
        return " ".join(self.args())

    def mask(self, grid: int, image_wh: tuple[int, int], image_size: int) -> Tensor:
        """(grid, grid) bool, True on kept token positions (after the shift, for outpainting); ValueError when nothing
        is kept, nothing is generated, or the rectangle is outside the image."""
        keep = torch.ones(grid, grid, dtype=torch.bool)
        if self.mode == "keep":
            n = round(grid * self.count / 100) if self.percent else self.count
            if self.percent and not 0 <= self.count <= 100:
                raise ValueError(f"--keep {self.side}:{self.count}%: a percentage must be in 0..100")
            if n <= 0:
                raise ValueError(f"--keep {self.side}:{self.count}{'%' if self.percent else ''} keeps nothing of the "
                                 f"{grid} token {'rows' if self.side == 'top' else 'columns'}: keep at least one")
            if n >= grid:
                raise ValueError(f"--keep {self.side}:{self.count}{'%' if self.percent else ''} keeps all {grid} token "
                                 f"{'rows' if self.side == 'top' else 'columns'}: nothing is left to generate")
            if self.side == "top":
                keep[n:] = False
            else:
                keep[:, n:] = False
        elif self.mode == "outpaint":
            if self.count <= 0:
                raise ValueError(f"--outpaint {self.side}:{self.count} adds nothing: add at least one token row/column")
            if self.count >= grid:
                raise ValueError(f"--outpaint {self.side}:{self.count} shifts the whole {grid}x{grid} token grid out: "
                                 f"nothing is kept; add fewer than {grid}")
            if self.side == "down":
                keep[grid - self.count:] = False
            else:
                keep[:, grid - self.count:] = False
        else:
            rows, cols = self.box_tokens(grid, image_wh, image_size)
            keep[rows, cols] = False
            if not keep.any():
                raise ValueError(f"--inpaint {','.join(map(str, self.box))} covers the whole token grid: nothing is kept")
        if self.prefix_only:
            first = int((~keep).reshape(-1).nonzero()[0])
            keep = (torch.arange(grid * grid) < first).view(grid, grid)
            if not keep.any():
                raise ValueError(f"{self.describe()}: the first token is generated, so a prefix keeps nothing")
        return keep

    def box_tokens(self, grid: int, image_wh: tuple[int, int], image_size: int) -> tuple[slice, slice]:
        """The token rows and columns the inpainting rectangle touches, through the short-side resize and centre
        crop that the tokenizer's view applies."""
        w, h = image_wh
        x0, y0, x1, y1 = self.box
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(f"--inpaint {x0},{y0},{x1},{y1} is outside the {w}x{h} px image: "
                             f"give 0 <= X0 < X1 <= {w} and 0 <= Y0 < Y1 <= {h}")
        rw, rh = resize_short_side(Image.new("1", (w, h)), image_size).size
        left, top = (rw - image_size) // 2, (rh - image_size) // 2
        per_token = image_size / grid

        def span(a: int, b: int, scale: float, offset: int) -> slice:
            lo = math.floor(max(a * scale - offset, 0) / per_token)
            hi = math.ceil(min(b * scale - offset, image_size) / per_token)
            return slice(lo, hi)

        cols, rows = span(x0, x1, rw / w, left), span(y0, y1, rh / h, top)
        if cols.start >= cols.stop or rows.start >= rows.stop:
            raise ValueError(f"--inpaint {x0},{y0},{x1},{y1} lies in the part of the {w}x{h} px image that the "
                             f"centre crop drops: choose a rectangle in its central {min(w, h)}x{min(w, h)} px")
        return rows, cols

    def shift(self, grid: Tensor, cell: int = 1) -> Tensor:
        """A token grid (..., h, w) (or an image, with ``cell`` pixels per token) moved to where it is kept: up or
        left by ``count`` tokens when outpainting; what wraps around lands where nothing is kept."""
        if self.mode != "outpaint":
            return grid
        return grid.roll(-self.count * cell, dims=-2 if self.side == "down" else -1)


def parse_region(keep: str | None = None, inpaint: str | None = None, outpaint: str | None = None,
                 prefix_only: bool = False) -> Region:
    """`--keep top:4 | top:50% | left:...`, `--inpaint X0,Y0,X1,Y1` or `--outpaint down:N | right:N` as a Region."""
    given = [name for name, value in (("--keep", keep), ("--inpaint", inpaint), ("--outpaint", outpaint)) if value]
    if len(given) != 1:
        raise ValueError("choose one region: --keep top:N|left:N (or N%), --inpaint X0,Y0,X1,Y1 or --outpaint down:N|right:N")
    if keep:
        side, _, amount = keep.strip().partition(":")
        percent = amount.endswith("%")
        number = amount[:-1] if percent else amount
        if side not in KEEP_SIDES or not number.strip().isdigit():
            raise ValueError(f"--keep {keep!r}: write top:N or left:N (N token rows/columns) or top:P% / left:P%")
        return Region("keep", side, int(number), percent=percent, prefix_only=prefix_only)
    if outpaint:
        side, _, number = outpaint.strip().partition(":")
        if side not in OUTPAINT_SIDES or not number.strip().isdigit():
            raise ValueError(f"--outpaint {outpaint!r}: write down:N or right:N (N token rows/columns to add)")
        return Region("outpaint", side, int(number), prefix_only=prefix_only)
    parts = [p.strip() for p in str(inpaint).split(",")]
    if len(parts) != 4 or not all(p.lstrip("-").isdigit() for p in parts):
        raise ValueError(f"--inpaint {inpaint!r}: write X0,Y0,X1,Y1, the rectangle to generate in pixels of the image")
    x0, y0, x1, y1 = (int(p) for p in parts)
    return Region("inpaint", box=(x0, y0, x1, y1), prefix_only=prefix_only)


@dataclass(frozen=True, kw_only=True)
class EditSettings(Sampling):
    """An edit grid: a region, and a row of ``per_class`` variants per class (class runs) or prompt (text runs)."""

    region: Region
    classes: tuple[int, ...] = ()
    prompts: tuple[str, ...] = ()

    def check(self, generator: GPT) -> None:
        """Raise ValueError naming the first setting the generator cannot edit with."""
        cfg = generator.config
        if cfg.condition == "text":
            if self.classes:
                raise ValueError("this run is text-conditioned: describe the result with prompts, not classes")
            if not self.prompts or any(not p.strip() for p in self.prompts):
                raise ValueError("write at least one prompt, one per row (no blank ones)")
        else:
            if self.prompts:
                raise ValueError("this run is class-conditional: choose classes, not prompts")
            if not self.classes:
                raise ValueError("pick at least one class (the image's own, or another)")
            bad = [c for c in self.classes if not 0 <= c < cfg.num_classes]
            if bad:
                raise ValueError(f"classes {','.join(map(str, bad))} are outside this generator's classes "
                                 f"0..{cfg.num_classes - 1}")
        self.check_sampling(cfg.vocab_size)

    @property
    def rows(self) -> int:
        return len(self.prompts) or len(self.classes)

    def command(self, run_dir: str, image: str, out: str = "edit.png") -> str:
        """The `gear edit` line that writes the same grid."""
        args = ["gear", "edit", run_dir, image, *self.region.args()]
        if self.classes:
            args += ["--classes", ",".join(map(str, self.classes))]
        for prompt in self.prompts:
            args += ["--prompt", prompt]
        return shlex.join(args + ["--num", str(self.per_class), "--cfg-scale", str(float(self.cfg_scale)),
                                  "--temperature", str(float(self.temperature)), "--top-k", str(self.top_k),
                                  "--top-p", str(float(self.top_p)), "--seed", str(self.seed), "--out", out])


@dataclass
class Edit:
    """An edit's input, what was kept, and its variants (``per_row`` per class or prompt, row by row)."""

    original: Tensor      # (3, S, S) in [-1, 1]: the input as the tokenizer sees it
    canvas: Tensor        # (3, S, S): the input where its tokens are kept (shifted when outpainting), grey elsewhere
    known: KnownTokens    # (h, w): the kept tokens (shifted) and their mask
    tokens: Tensor        # (rows * per_row, h, w) int64: the sampled grids
    images: Tensor        # (rows * per_row, 3, S, S) in [-1, 1], on the CPU
    labels: list[str]     # one per row: the class id or the prompt
    per_row: int
    text: bool            # rows are prompts (written beside the grid)

    def grid_images(self) -> Tensor:
        """(rows * (per_row + 2), 3, S, S): per row, the input, the mask tile and the variants."""
        per = self.images.view(len(self.labels), self.per_row, *self.images.shape[1:])
        head = torch.stack([self.original, self.canvas]).expand(len(self.labels), 2, *self.original.shape)
        return torch.cat([head, per], dim=1).flatten(0, 1)


def read_image(path: str | Path) -> Image.Image:
    """An image file decoded as RGB; ValueError in one line when it does not decode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        return load_rgb(path)
    except ValueError:
        raise ValueError(f"{path.name} is not an image gear can read: give a PNG, JPEG, WebP, BMP or GIF file") from None


@dataclass
class EditPlan:
    """What an edit keeps, before anything is sampled."""

    original: Tensor      # (3, S, S) in [-1, 1]: the input as the tokenizer sees it
    canvas: Tensor        # (3, S, S): the input where its tokens are kept (shifted when outpainting), grey elsewhere
    known: KnownTokens    # (h, w): the kept tokens (shifted) and their mask


@torch.no_grad()
def plan_edit(image: str | Path | Image.Image, tokenizer: Tokenizer, grid_size: int, region: Region) -> EditPlan:
    """Encode ``image`` as the tokenizer sees it and lay ``region`` over its token grid (the page's preview)."""
    pil = image if isinstance(image, Image.Image) else read_image(image)
    size = grid_size * tokenizer.downsample
    keep = region.mask(grid_size, pil.size, size)
    original = square_view(pil, size)
    device = next(tokenizer.parameters()).device
    encoded = tokenizer.encode(original.unsqueeze(0).to(device))[0].cpu()
    kept_px = keep.repeat_interleave(tokenizer.downsample, 0).repeat_interleave(tokenizer.downsample, 1)
    shifted = region.shift(original, tokenizer.downsample)
    canvas = torch.where(kept_px, shifted, torch.full_like(shifted, MASK_GREY))
    return EditPlan(original=original, canvas=canvas, known=KnownTokens(region.shift(encoded), keep))


@torch.no_grad()
def edit(image: str | Path | Image.Image, tokenizer: Tokenizer, generator: GPT | TextToImage, settings: EditSettings,
         on_token: Callable[[int, int], None] | None = None) -> Edit:
    """Encode ``image``, keep ``settings.region`` of its tokens and sample the rest for each class or prompt.

    ``generator``: a class-conditional GPT, or a TextToImage pipeline (its text encoder writes the prompts'
    features). Everything is computed on the generator's device; the images come back on the CPU."""
    pipe = None if isinstance(generator, torch.nn.Module) else generator
    gen = generator if pipe is None else pipe.generator
    settings.check(gen)
    plan = plan_edit(image, tokenizer, gen.config.grid_size, settings.region)
    device = gen.tok_embeddings.weight.device
    sampling = dict(cfg_scale=settings.cfg_scale, temperature=settings.temperature, top_k=settings.top_k,
                    top_p=settings.top_p, seed=settings.seed, on_token=on_token, known=plan.known)
    if pipe is not None:
        order = torch.arange(settings.rows).repeat_interleave(settings.per_class)
        tokens = gen.generate(pipe.encode(list(settings.prompts)).select(order), **sampling)
        labels = list(settings.prompts)
    else:
        classes = torch.tensor(settings.classes, device=device).repeat_interleave(settings.per_class)
        tokens = gen.generate(classes, **sampling)
        labels = [str(c) for c in settings.classes]
    images = tokenizer.decode(tokens).float().cpu()
    return Edit(original=plan.original, canvas=plan.canvas, known=plan.known, tokens=tokens.cpu(), images=images,
                labels=labels, per_row=settings.per_class, text=pipe is not None)


def save_edit_grid(result: Edit, out: str | Path) -> Path:
    """Write the edit as one PNG: a row per class or prompt (input, mask, variants); prompts beside their rows."""
    if result.text:
        return save_prompt_grid(result.grid_images(), result.labels, out, per_prompt=result.per_row + 2)
    return save_image_grid(result.grid_images(), out, nrow=result.per_row + 2)
