"""The Gaussian noise ε of the diffusion, drawn reproducibly from a ``torch.Generator``,
accepted wherever a sampler or the diffusion takes ``generator=``."""

from __future__ import annotations

import torch

Generator = torch.Generator


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
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)
