"""The Gaussian noise ε of the diffusion, drawn reproducibly.

A ``torch.Generator`` draws a batch's noise in one stream; :class:`ImageGenerators` draws each
image's from its own seed, so an image does not depend on the batch it is drawn in. Both are
accepted wherever a sampler or the diffusion takes ``generator=``.
"""

from __future__ import annotations

import torch


class ImageGenerators:
    """One generator per image of a batch: image i's noise comes from its own generator, so
    an image is the same whatever batch it is drawn in (the batch size is then a choice of
    execution, not of content). Stands wherever a ``torch.Generator`` is taken as
    ``generator=``; :func:`randn` draws one row from each."""

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} generators for a batch of {shape[0]}")
        return torch.stack(
            [
                torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype)
                for g in self.generators
            ]
        )


Generator = torch.Generator | ImageGenerators


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    device: torch.device | str,
    generator: Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise drawn from ``generator`` (on its own device) and moved to ``device``.

    Drawing on the generator's device means a CPU generator gives the same samples on any device.
    """
    if isinstance(generator, ImageGenerators):
        return generator.randn(tuple(shape), dtype).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)
