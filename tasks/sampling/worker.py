"""The per-process half of sampling: seeds, model loading and one shard's reverse process.

Everything random in shard ``i`` (its class labels, x_T and every step's noise) comes from
seeds derived from ``(run seed, i)`` alone, drawn on one CPU generator per shard. The sampler
steps the whole shard; ``batch_size`` only bounds the images per network call (the
denoiser's micro-batches), so an image depends on the set's spec, never on which actor ran
it, when, what else it ran, or the micro-batch.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch

from admflow.config import (
    ClassifierConfig,
    DiffusionConfig,
    UNetConfig,
    UpsamplerConfig,
)
from models.denoiser import Denoiser
from models.fast import InferencePlan, apply_plan, plan_inference
from models.resize import downsample_area, upsample_bilinear
from models.samplers import SAMPLERS, initial_noise, sampler_grid, sampler_options
from tasks.sampling.spec import NonFiniteSampleError, SamplerSpec, shard_seed


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _load_state(data: bytes) -> dict[str, torch.Tensor]:
    from models.checkpoints import read_state_dict

    return read_state_dict(io.BytesIO(data))


def _prepare_classifier(model: torch.nn.Module, plan: InferencePlan) -> torch.nn.Module:
    """The classifier stays an ordinary module: guidance differentiates through it."""
    model.to(plan.device)
    if plan.precision == "fp16":
        model.convert_to_fp16()  # type: ignore[operator]
    return model.eval().requires_grad_(False)


class ShardSampler:
    """Holds the networks of one sampling process and turns shard requests into uint8 images."""

    def __init__(self, spec: SamplerSpec, model_bytes: bytes, classifier_bytes: bytes | None):
        from models.build import build_classifier, build_unet, build_upsampler
        from models.checkpoints import load_state_dict_strict
        from models.diffusion_factory import create_diffusion

        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.device = pick_device(spec.device)
        model: torch.nn.Module
        self.small_size: int | None = None  # the upsampler's low-res input size
        if spec.kind == "upsample":
            up = UpsamplerConfig.model_validate(spec.network)
            self.net_cfg, self.small_size = up.unet, up.small_size
            model = build_upsampler(up, device="meta")
        else:
            self.net_cfg = UNetConfig.model_validate(spec.network)
            model = build_unet(self.net_cfg, device="meta")
        load_state_dict_strict(model, _load_state(model_bytes), source="diffusion checkpoint")
        # The production fast path (models.fast): same outputs in float32, see plan_inference.
        self.plan = plan_inference(self.device, self.net_cfg.use_fp16, spec.compile)
        self.model = apply_plan(self.plan, model)
        del model
        self.diffusion = create_diffusion(
            DiffusionConfig.model_validate(spec.diffusion), timestep_respacing=spec.respacing
        )
        self.cond_fn = None
        # With a classifier the guided path runs even at scale 0 (it then adds exactly zero).
        if spec.classifier is not None:
            from models.guidance import cond_fn_from_classifier

            ccfg = ClassifierConfig.model_validate(spec.classifier)
            clf = build_classifier(ccfg, device="meta")
            load_state_dict_strict(
                clf, _load_state(classifier_bytes), source="classifier checkpoint"
            )
            clf_plan = plan_inference(self.device, ccfg.use_fp16)
            self.classifier = _prepare_classifier(clf, clf_plan)
            self.cond_fn = cond_fn_from_classifier(self.classifier, spec.classifier_scale)

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "precision": self.plan.precision,
            "compile": self.plan.compile,
        }

    def _denoiser(self, kwargs: dict[str, torch.Tensor]) -> Denoiser:
        """The network as D(x_t, t) with this set's clipping and guidance (models.denoiser)."""
        from models.guidance import drop_class_labels

        unconditional = self.net_cfg.num_classes is None  # the labels are the classifier's only
        return Denoiser(
            self.diffusion,
            drop_class_labels(self.model) if unconditional else self.model,
            model_kwargs=kwargs,
            clip_denoised=self.spec.clip_denoised,
            cond_fn=self.cond_fn,
            cfg_scale=self.spec.cfg_scale,
            null_class=self.net_cfg.num_classes,  # classifier-free ∅ is label num_classes
            micro_batch=self.spec.batch_size,
        )

    def _low_res(self, images: np.ndarray) -> torch.Tensor:
        """Base samples (uint8 NHWC) as the upsampler's [-1, 1] NCHW conditioning input."""
        x = (
            torch.from_numpy(np.array(images)).to(self.device).permute(0, 3, 1, 2).float() / 127.5
            - 1.0
        )
        small = self.small_size
        assert small is not None, "only an upsampler takes low-resolution inputs"
        # a base set at another size: resampled to the size the upsampler was trained on, by
        # the resizes of models.resize (box averaging down, as its training inputs were made)
        if x.shape[-1] > small:
            x = downsample_area(x, small)
        elif x.shape[-1] < small:
            x = upsample_bilinear(x, small).clamp(-1.0, 1.0)
        return x

    def _sample_batch(self, n: int, kwargs: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        size = self.net_cfg.image_size
        x_T = initial_noise((n, self.net_cfg.in_channels, size, size), self.device, gen)
        name = self.spec.sampler
        grid = sampler_grid(name, self.diffusion, self.spec.solver_steps, self.spec.step_schedule)
        options = sampler_options(name, eta=self.spec.eta)
        out = SAMPLERS[name](self._denoiser(kwargs), x_T, grid, gen, **options)
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).flatten(1).any(1).sum())
            raise NonFiniteSampleError(f"{bad} of {n} images hold NaN/inf (shard seed {seed})")
        return ((out + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()

    def sample(
        self, index: int, labels: np.ndarray, low_res: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``index``: images (uint8 NHWC) for ``labels`` (and base images when upsampling)."""
        kwargs: dict[str, torch.Tensor] = {}
        if self.net_cfg.num_classes is not None or self.cond_fn is not None:
            kwargs["y"] = torch.from_numpy(np.array(labels, dtype=np.int64)).to(self.device)
        if low_res is not None:
            kwargs["low_res"] = self._low_res(low_res)
        stream = 2 if self.spec.kind == "upsample" else 1
        seed = shard_seed(self.spec.seed, index, stream)
        try:
            images = self._sample_batch(len(labels), kwargs, seed)
        except NonFiniteSampleError as e:
            raise NonFiniteSampleError(
                f"shard {index}, after {self.diffusion.num_timesteps} sampling steps: {e}; the "
                "model or its sampling settings diverge, so the shard is not written"
            ) from None
        return images.numpy(), np.asarray(labels, dtype=np.int64)
