"""Run a built ADM network fast for inference (sampling) on CPU or GPU.

:func:`prepare_for_inference` returns an :class:`InferenceModel`: a module with the network's own
call signature ``model(x, t, y=...)`` (``low_res=`` for the upsampler) that the samplers take in
place of the network. It works on a private copy, so the network passed in (and its state dict)
is untouched. What it does, and why:

* ``eval()``, no parameter gradients, and :func:`torch.inference_mode` around the call: no
  autograd bookkeeping. The result is cloned out of inference mode, so guidance code that later
  differentiates through the sampler's arithmetic gets an ordinary tensor.
* ``channels_last``: oneDNN's convolutions (CPU) and cuDNN's (GPU, half precision) are faster in
  NHWC; weights are converted once, the input on every call, the output goes back to NCHW.
* ``precision="bf16"``: the torso's convolutions (everything between the embedding and the
  output head, exactly the part the released ``use_fp16`` converts) get bfloat16 weights, so
  activations stay bfloat16 with no per-call casting; timestep/class embeddings and the output
  head stay float32, as in the released fp16 models. GroupNorm reads the bfloat16 activations
  directly and accumulates its statistics in float32 (PyTorch's mixed-type kernel), which is
  what ``GroupNorm32`` computes, without the two extra full-tensor casts.
  Only worth it where bf16 is native (:func:`native_bf16`); on CPUs without AVX512_BF16/AMX
  oneDNN emulates it and bf16 is slower than float32.
* Attention calls the fused (flash) SDPA kernel with contiguous q, k, v (the plain module's
  transposed views make PyTorch fall back to the unfused math path); ResBlocks apply AdaGN as
  one ``addcmul`` followed by an in-place SiLU, and add the residual in place. Both are modes
  of the network's own modules (``QKVAttention.contiguous``, ``ResBlock.fused``).
* GroupNorm followed by SiLU (each ResBlock's ``in_layers`` and the output head) runs as one
  module that applies SiLU in place on the fresh GroupNorm output: one tensor fewer per block.
* ``compile=True``: :func:`torch.compile` (inductor) with weight freezing; it fuses the
  elementwise chains (GroupNorm, AdaGN scale/shift, SiLU, residual adds) and prepacks weights.
  Compilation takes a while and happens on the first call (and again for a new input shape).

The float32 path computes the same operations on the same values as the plain network; the
only differences come from summing in another order (NHWC convolution kernels, the flash
attention kernel) and from ``addcmul`` rounding once where ``a * b + c`` rounds twice: max abs
difference ~3e-6 on unit-scale outputs, tested against FP32_ATOL = 1e-4. bf16 DDIM samples
are held to BF16_SAMPLE_ATOL / BF16_SAMPLE_RMSE of the fp32 ones from the same noise.
``compile`` is off by default: compiling costs minutes per input shape, paid by every
sampling process.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import GroupNorm32
from .unet import UNetModel
from .unet_blocks import QKVAttention, ResBlock

Precision = Literal["fp32", "bf16", "fp16"]
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Tolerances the tests hold the fast paths to (and the benchmark reports against).
FP32_ATOL = 1e-4  # fast fp32 vs plain fp32 network output (observed ~1e-6)
BF16_SAMPLE_ATOL = 0.15  # DDIM samples in [-1, 1], bf16 vs fp32, same noise: max abs difference
BF16_SAMPLE_RMSE = 0.02  # ... and root-mean-square difference


@dataclass(frozen=True)
class InferencePlan:
    """How a network runs for sampling on one device (see :func:`plan_inference`)."""

    device: torch.device
    precision: Precision
    channels_last: bool
    compile: bool
    tf32: bool  # TF32 tensor-core matmuls/convolutions for what stays float32 (CUDA)


def plan_inference(device: torch.device, use_fp16: bool, compile: bool = False) -> InferencePlan:
    """The one decision of device, precision and layout for every sampling network.

    CPU: float32 (the fast path is numerically the plain network; half precision is emulated
    or no faster on most CPUs). CUDA: the released ``use_fp16`` torso in float16 (as the paper
    sampled), TF32 for the float32 parts, channels_last for cuDNN's NHWC kernels.
    ``compile`` is the config's switch (``sampling.compile``).
    """
    if device.type == "cuda":
        precision: Precision = "fp16" if use_fp16 else "fp32"
        return InferencePlan(device, precision, True, compile, tf32=True)
    return InferencePlan(device, "fp32", True, compile, tf32=False)


def apply_plan(plan: InferencePlan, model: nn.Module) -> InferenceModel:
    """``model`` on the plan's device, prepared for inference (a copy; see the module doc)."""
    if plan.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True  # per process: only float32 parts use it
        torch.backends.cudnn.allow_tf32 = True
    return prepare_for_inference(
        model.to(plan.device), plan.precision, plan.channels_last, plan.compile
    )


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (else bf16 is emulated and slow).

    On CPU that needs AVX512_BF16 or AMX; e.g. Cascade Lake Xeons have neither, and there
    bf16 convolutions and matmuls run several times slower than float32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class MixedGroupNorm(GroupNorm32):
    """GroupNorm32 without the casts: the kernel takes bf16 input and float32 statistics itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GroupNormSiLU(MixedGroupNorm):
    """``SiLU(GroupNorm(x))`` with the SiLU applied in place on the norm's fresh output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x), inplace=True)


def _as(norm: nn.GroupNorm, cls: type[MixedGroupNorm]) -> MixedGroupNorm:
    """The same parameters (same state-dict keys) in a module of class ``cls``."""
    new = cls(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine)
    new.weight, new.bias = norm.weight, norm.bias
    return new


def _fuse_norm_silu(seq: nn.Sequential) -> None:
    """Turn ``[GroupNorm, SiLU, ...]`` into ``[GroupNormSiLU, Identity, ...]`` (indices kept)."""
    if isinstance(seq[0], nn.GroupNorm) and isinstance(seq[1], nn.SiLU):
        seq[0] = _as(seq[0], GroupNormSiLU)
        seq[1] = nn.Identity()


def fuse_norms(model: nn.Module) -> None:
    """Replace GroupNorms in place: fused with SiLU where the next op is SiLU, else mixed-type.

    Only Sequentials that are always called whole are fused (ResBlock ``in_layers`` and the
    output head); ``out_layers`` is not, because AdaGN applies scale/shift between the two.
    """
    for module in model.modules():
        if isinstance(module, ResBlock):
            _fuse_norm_silu(module.in_layers)
    head = getattr(model, "out", None)
    if isinstance(head, nn.Sequential) and len(head) > 1:
        _fuse_norm_silu(head)
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is GroupNorm32:
                setattr(parent, name, _as(child, MixedGroupNorm))


def fuse_blocks(model: nn.Module) -> None:
    """Put ResBlocks and attention in their fused inference modes (no new modules or keys)."""
    for module in model.modules():
        if isinstance(module, ResBlock):
            module.fused = True
        elif isinstance(module, QKVAttention):
            module.contiguous = True


def convert_torso(model: UNetModel, dtype: torch.dtype) -> None:
    """Cast the torso's convolutions to ``dtype`` (bf16 analogue of ``convert_to_fp16``)."""
    for part in (model.input_blocks, model.middle_block, model.output_blocks):
        for module in part.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                module.to(dtype)


class InferenceModel(nn.Module):
    """A network prepared by :func:`prepare_for_inference`; call it like the network."""

    def __init__(self, net: nn.Module, precision: Precision, channels_last: bool, compiled: Any):
        super().__init__()
        self.net = net
        self.precision = precision
        self.channels_last = channels_last
        self._run = compiled if compiled is not None else net

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode():
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self._run(x, timesteps, **kwargs)
            out = out.to(x.dtype)
        # A normal tensor (not an inference tensor) in the default layout.
        return out.clone(memory_format=torch.contiguous_format)


def prepare_for_inference(
    model: nn.Module,
    precision: Precision = "fp32",
    channels_last: bool = True,
    compile: bool = False,
    fuse: bool = True,
) -> InferenceModel:
    """A fast inference copy of ``model`` (a UNetModel or SuperResModel); see the module doc."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    net = copy.deepcopy(model).eval().requires_grad_(False)
    if precision in HALF:
        if not isinstance(net, UNetModel):
            raise TypeError(f"{precision} inference needs a UNetModel (its torso is converted)")
        convert_torso(net, HALF[precision])
    if fuse:
        fuse_norms(net)
        fuse_blocks(net)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    compiled = None
    if compile:
        compiled = torch.compile(net, dynamic=False, options={"freezing": True})
    return InferenceModel(net, precision, channels_last, compiled)
