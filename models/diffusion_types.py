"""The three choices that define a Gaussian diffusion's network and objective (IDDPM §3):
what the network's output predicts, how the reverse variance Σ_θ is obtained, and which loss
trains it. models.diffusion_factory picks them from the config.
"""

from __future__ import annotations

import enum


class ModelMeanType(enum.Enum):
    """What the network's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # μ_θ(x_t, t) directly
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # ε


class ModelVarType(enum.Enum):
    """How Σ_θ(x_t, t) is obtained."""

    FIXED_SMALL = enum.auto()  # σ_t² = β̃_t (the posterior variance; lower bound)
    FIXED_LARGE = enum.auto()  # σ_t² = β_t (upper bound)
    LEARNED = enum.auto()  # the network outputs log Σ directly
    LEARNED_RANGE = enum.auto()  # the network outputs v ∈ [−1, 1], interpolating log β̃_t..log β_t


class LossType(enum.Enum):
    MSE = enum.auto()  # L_simple (+ vb term when Σ is learned: L_hybrid)
    RESCALED_MSE = enum.auto()  # like MSE, vb term weighted λ·T (the paper's λ L_vlb)
    KL = enum.auto()  # one sampled term of L_vlb
    RESCALED_KL = enum.auto()  # that term times T, an unbiased estimate of L_vlb itself

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)
