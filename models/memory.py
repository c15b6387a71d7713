"""How many bytes a network's activations take, counted without allocating them.

A pass runs under torch's ``FakeTensorMode``: tensors carry shape, dtype and device but no
data, so the forward and backward of the 554M-parameter UNet at 512 px need no memory and take
seconds on a CPU. Two counts per pass, each storage counted once (a tensor saved by two ops, or
a view of a saved tensor, is one allocation):

* saved: the bytes autograd keeps for the backward pass, seen through
  ``torch.autograd.graph.saved_tensors_hooks`` during the forward;
* peak: the most bytes alive at any one time over forward and backward, following every storage
  an op creates until it is freed (what the caching allocator must hold, fragmentation aside).

Parameters, buffers and gradients that exist before the pass are not activations (callers count
those by formula); the inputs are made inside the pass and counted. Counts at two batch sizes
give what one more image costs and the batch-independent rest (autocast's float16 copies of the
weights, weight gradients on their way to ``.grad``).

Precision follows what each stage does on a GPU. Training autocasts to float16 (here the CPU
autocast, whose float16 lists for convolutions, matmuls and linears are CUDA's); sampling
casts the torso (``convert_to_fp16``, the released ``use_fp16``). Attention takes the kernel
``scaled_dot_product_attention`` picks on CPU tensors: the fused one (output and log-sum-exp
kept) where q, k and v have unit stride in the channel dimension, else the math path (the T x T
weights kept), the same condition under which the CUDA kernels fall back.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from admflow.config import ClassifierConfig, UNetConfig, UpsamplerConfig

from .build import build_classifier, build_unet, build_upsampler
from .fast import fuse_blocks

Builder = Callable[[torch.device], nn.Module]
Inputs = Callable[[int, torch.device], tuple[tuple[Any, ...], dict[str, Any]]]
PassKind = Literal["train", "infer", "input_grad"]
PASS_KINDS: tuple[PassKind, ...] = ("train", "infer", "input_grad")
Engine = Literal["fake", "real"]
ENGINES: tuple[Engine, ...] = ("fake", "real")


@dataclass(frozen=True)
class PassCount:
    """One pass at one batch size: bytes saved for backward, and the peak of live bytes."""

    saved: int
    peak: int


@dataclass(frozen=True)
class ActivationProfile:
    """A pass's activation bytes as ``fixed + batch * per_image``."""

    saved_per_image: int
    peak_per_image: int
    peak_fixed: int

    def peak(self, batch: int) -> int:
        return self.peak_fixed + batch * self.peak_per_image


class _LiveBytes(TorchDispatchMode):
    """Follows every storage an op creates until it is freed, and the peak of their sum."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.ignore = ignore  # ids of storages that existed before the pass
        self.tracked: set[int] = set()
        self.current = 0
        self.peak = 0

    def _free(self, key: int, nbytes: int) -> None:
        self.tracked.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)  # the Python storage lives exactly as long as the storage
            if key in self.ignore or key in self.tracked:
                continue  # a view or an in-place result: no new memory
            nbytes = storage.nbytes()
            self.tracked.add(key)
            self.current += nbytes
            weakref.finalize(storage, self._free, key, nbytes)
        self.peak = max(self.peak, self.current)
        return out


class _SavedBytes:
    """Bytes of the distinct storages autograd saves for backward."""

    def __init__(self, ignore: set[int]):
        self.ignore = ignore
        self.storages: dict[int, torch.UntypedStorage] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if id(storage) not in self.ignore:
            self.storages[id(storage)] = storage  # held: ids stay unique while counting
        return t

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield

    @property
    def total(self) -> int:
        return sum(s.nbytes() for s in self.storages.values())


def _existing_storages(net: nn.Module) -> set[int]:
    tensors = [*net.parameters(), *net.buffers()]
    tensors += [p.grad for p in net.parameters() if p.grad is not None]
    return {id(t.untyped_storage()) for t in tensors}


def _prepare(net: nn.Module, kind: PassKind, half: bool) -> None:
    if kind == "train":
        net.train()
        for p in net.parameters():  # made before the pass: .grad is counted with the states
            p.grad = torch.zeros_like(p)
        return
    net.eval().requires_grad_(False)
    if kind == "infer":
        fuse_blocks(net)  # the sampling actors' inference mode (models.fast)
    if half:
        net.convert_to_fp16()  # type: ignore[operator]


def _autocast(kind: PassKind, half: bool) -> contextlib.AbstractContextManager:
    if half and kind == "train":
        return torch.autocast("cpu", dtype=torch.float16)
    return contextlib.nullcontext()


def count_pass(
    build: Builder, inputs: Inputs, batch: int, kind: PassKind, half: bool, engine: Engine = "fake"
) -> PassCount:
    """One pass of the network ``build(device)`` on ``inputs(batch, device)``: "train"
    (forward, then backward of a loss on the output), "infer" (forward under no_grad) or
    "input_grad" (the gradient of a log-probability with respect to the first input, as
    classifier guidance takes it).

    ``engine``: "fake" (FakeTensorMode: no memory) or "real" (CPU tensors, to check the fake
    count on small networks)."""
    if kind not in PASS_KINDS or engine not in ENGINES:
        raise ValueError(f"unknown pass {kind!r} or engine {engine!r}: use {PASS_KINDS}, {ENGINES}")
    device = torch.device("cpu")
    with FakeTensorMode() if engine == "fake" else contextlib.nullcontext():
        net = build(device)
        _prepare(net, kind, half)
        ignore = _existing_storages(net)
        live, saved = _LiveBytes(ignore), _SavedBytes(ignore)
        with live:
            args, kwargs = inputs(batch, device)
            x = args[0].requires_grad_(kind == "input_grad")
            with (
                torch.set_grad_enabled(kind != "infer"),
                _autocast(kind, half),
                saved.hooks(),
            ):
                out = net(*args, **kwargs)
            if kind == "train":
                out.float().square().mean().backward()
            elif kind == "input_grad":
                log_p = F.log_softmax(out.float(), dim=-1)[:, 0]
                torch.autograd.grad(log_p.sum(), x)
            del out, args, kwargs, x
        return PassCount(saved=saved.total, peak=live.peak)


def profile(
    build: Builder,
    inputs: Inputs,
    kind: PassKind,
    half: bool,
    engine: Engine = "fake",
    batches: tuple[int, int] = (1, 64),
) -> ActivationProfile:
    """Per-image and batch-independent bytes of a pass, from its counts at two batch sizes.

    The peak is the largest of the passes' live totals, each linear in the batch, so it is
    convex in the batch: the line through the two counts lies above it between them (at
    batch 5 of the demo UNet by 1.5%). The default pair spans the micro-batches the presets
    use; fake tensors cost the same at any batch."""
    lo, hi = batches
    one = count_pass(build, inputs, lo, kind, half, engine)
    two = count_pass(build, inputs, hi, kind, half, engine)
    per_image = (two.peak - one.peak) // (hi - lo)
    return ActivationProfile(
        saved_per_image=(two.saved - one.saved) // (hi - lo),
        peak_per_image=per_image,
        peak_fixed=max(0, one.peak - lo * per_image),
    )


# ---------------------------------------------------------------- the ADM networks


Network = UNetConfig | ClassifierConfig | UpsamplerConfig


def network_pass(section: Network, use_checkpoint: bool | None = None) -> tuple[Builder, Inputs]:
    """The builder and the inputs of one of the pipeline's networks (``use_checkpoint``
    overrides the section's gradient checkpointing)."""
    if isinstance(section, ClassifierConfig):
        size, channels = section.image_size, section.in_channels
        return partial(build_classifier, section), _images(size, channels, None, None)
    if isinstance(section, UpsamplerConfig):
        unet = _checkpointed(section.unet, use_checkpoint)
        up = section.model_copy(update={"unet": unet})
        inputs = _images(unet.image_size, unet.in_channels, unet.num_classes, section.small_size)
        return partial(build_upsampler, up), inputs
    unet = _checkpointed(section, use_checkpoint)
    inputs = _images(unet.image_size, unet.in_channels, unet.num_classes, None)
    return partial(build_unet, unet), inputs


def weights(section: Network, half: bool = False) -> tuple[int, int]:
    """(parameters, bytes of them) of the section's network, built on the meta device; ``half``:
    after ``convert_to_fp16`` (the torso's convolutions in float16, as sampling runs it)."""
    build, _ = network_pass(section)
    net = build(torch.device("meta"))
    if half:
        net.convert_to_fp16()  # type: ignore[operator]
    params = list(net.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _checkpointed(unet: UNetConfig, use_checkpoint: bool | None) -> UNetConfig:
    if use_checkpoint is None or use_checkpoint == unet.use_checkpoint:
        return unet
    return unet.model_copy(update={"use_checkpoint": use_checkpoint})


def _images(size: int, channels: int, num_classes: int | None, small: int | None) -> Inputs:
    def make(batch: int, device: torch.device) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        if small is not None:
            kwargs["low_res"] = torch.randn(batch, channels, small, small, device=device)
        if num_classes is not None:
            kwargs["y"] = torch.zeros(batch, dtype=torch.long, device=device)
        x = torch.randn(batch, channels, size, size, device=device)
        return (x, torch.zeros(batch, dtype=torch.long, device=device)), kwargs

    return make
