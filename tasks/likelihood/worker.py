"""The per-process half: one network replica that turns a shard of test images into their
bounds. The noise of micro-batch b of shard i comes from a CPU generator seeded by
``(seed, i, b)`` alone, so a shard's numbers never depend on which process ran it."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from admflow.config import DiffusionConfig, UNetConfig
from tasks.data.read import to_model_input
from tasks.likelihood.spec import NOISE_STREAM, NllSpec
from tasks.sampling.spec import batch_seed
from tasks.sampling.worker import pick_device


class ShardBound:
    """Holds the network and its diffusion; :meth:`bound` evaluates one shard."""

    def __init__(self, spec: NllSpec, device: str, torch_threads: int, model_bytes: bytes):
        from models.build import build_unet
        from models.checkpoints import load_state_dict_strict, read_state_dict
        from models.diffusion_factory import create_diffusion

        torch.set_num_threads(torch_threads)
        self.spec = spec
        self.device = pick_device(device)
        model = build_unet(UNetConfig.model_validate(spec.network), device="meta")
        state = read_state_dict(io.BytesIO(model_bytes))
        load_state_dict_strict(model, state, source=f"diffusion checkpoint {spec.checkpoint}")
        # float32 throughout: the bound sums thousands of small terms
        self.model = model.to(self.device).float().eval().requires_grad_(False)
        # the model's own timesteps: no respacing
        self.diffusion = create_diffusion(DiffusionConfig.model_validate(spec.diffusion))

    def info(self) -> dict[str, Any]:
        return {"device": str(self.device), "timesteps": self.diffusion.num_timesteps}

    def bound(
        self, index: int, images: np.ndarray, labels: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        """Shard ``index``: per-image "total_bpd", "prior_bpd", and "vb_sum" per timestep."""
        from models.likelihood import batched_bpd

        spec = self.spec
        x = torch.from_numpy(to_model_input(images)).to(self.device)
        y = None if labels is None else torch.from_numpy(labels).to(self.device)
        if spec.network.get("num_classes") is None:
            y = None

        def generator_for(b: int) -> torch.Generator:
            return torch.Generator().manual_seed(batch_seed(spec.seed, index, b, NOISE_STREAM))

        out = batched_bpd(
            self.diffusion, self.model, x, spec.batch_size, generator_for, y, spec.clip_denoised
        )
        return {k: v.double().cpu().numpy() for k, v in out.items()}
