"""Build the diffusion described by a DiffusionConfig (the released flags' mapping).

* learn_sigma -> LEARNED_RANGE Σ (IDDPM); else FIXED_SMALL (sigma_small) or FIXED_LARGE.
* predict_xstart -> START_X mean; else EPSILON.
* use_kl -> RESCALED_KL (train on L_vlb); rescale_learned_sigmas -> RESCALED_MSE; else MSE.
  With a learned Σ the MSE types give L_hybrid = L_simple + λ L_vlb, λ = vlb_weight
  (see GaussianDiffusion.vb_loss_weight).
* timestep_respacing: "" keeps all ``steps``; else see models.respace.space_timesteps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.diffusion_types import LossType, ModelMeanType, ModelVarType
from models.respace import SpacedDiffusion, space_timesteps
from models.schedules import get_named_beta_schedule

if TYPE_CHECKING:  # only the type: any object with these fields will do
    from admflow.config import DiffusionConfig


def create_diffusion(cfg: DiffusionConfig, timestep_respacing: str = "") -> SpacedDiffusion:
    betas = get_named_beta_schedule(cfg.noise_schedule, cfg.steps)
    if cfg.use_kl:
        loss_type = LossType.RESCALED_KL
    elif cfg.rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if cfg.learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    elif cfg.sigma_small:
        var_type = ModelVarType.FIXED_SMALL
    else:
        var_type = ModelVarType.FIXED_LARGE
    respacing = timestep_respacing or str(cfg.steps)
    return SpacedDiffusion(
        use_timesteps=space_timesteps(cfg.steps, respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if cfg.predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=cfg.rescale_timesteps,
        vlb_weight=cfg.vlb_weight,
    )
