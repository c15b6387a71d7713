"""What a likelihood evaluation is: the network, its diffusion (every one of its own timesteps,
never respaced), the test images and how they are cut into shards and micro-batches. Its
fingerprint names the result, so a rerun continues only the same evaluation."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from admflow import storage
from admflow.config import AdmConfig, ConfigError
from tasks.likelihood.testset import TestSet
from tasks.sampling.weights import resolve_checkpoint

FORMAT = "admflow-nll/1"
NOISE_STREAM = 3  # batch_seed's stream for the bound's noise (1, 2: sampling, upsampling)


@dataclass(frozen=True)
class NllSpec:
    checkpoint: str  # what the user gave
    weights: str  # the state-dict file read
    weights_sha256: str
    network: dict  # UNetConfig as JSON
    diffusion: dict  # DiffusionConfig as JSON
    data: str
    data_sha256: str
    num_images: int
    shard_size: int
    batch_size: int
    seed: int
    clip_denoised: bool

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def bounds(self, index: int) -> tuple[int, int]:
        lo = index * self.shard_size
        return lo, min(lo + self.shard_size, self.num_images)

    def fingerprint(self) -> str:
        """The identity of the result: contents, not locations."""
        ident = {
            k: v for k, v in asdict(self).items() if k not in ("checkpoint", "weights", "data")
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class NllOptions:
    """How to run it (never part of the result's identity)."""

    workers: int = 1  # Ray actors; 0 runs in this process
    device: str = "auto"
    torch_threads: int = 1
    max_shards: int | None = None  # stop after this many new shards (a rerun continues)
    progress: bool = True


def build_nll_spec(
    cfg: AdmConfig,
    checkpoint: str,
    test: TestSet,
    *,
    shard_size: int,
    batch_size: int,
    seed: int = 0,
    clip_denoised: bool = True,
) -> NllSpec:
    """The evaluation of ``checkpoint`` (ours, or a released .pt with ``cfg``'s network) on
    ``test``; a test set the network cannot read fails here, naming both."""
    ckpt = resolve_checkpoint(checkpoint)
    source = ckpt.config or cfg
    net, diffusion = source.model, source.diffusion
    if test.image_size != net.image_size:
        raise ConfigError(
            f"test set {test.uri} holds {test.image_size}px images; the network takes "
            f"{net.image_size}px (pick the matching preset or test set)"
        )
    if net.num_classes is not None:
        if test.labels is None:
            raise ConfigError(
                f"the network is class-conditional; test set {test.uri} has no labels "
                "(an .npz needs arr_1, a shard set class folders)"
            )
        if int(np.min(test.labels)) < 0 or int(np.max(test.labels)) >= net.num_classes:
            raise ConfigError(f"test set {test.uri}: labels outside [0, {net.num_classes})")
    return NllSpec(
        checkpoint=checkpoint,
        weights=ckpt.weights,
        weights_sha256=storage.content_hash(ckpt.weights),
        network=net.model_dump(mode="json"),
        diffusion=diffusion.model_dump(mode="json"),
        data=test.uri,
        data_sha256=test.sha256,
        num_images=len(test.images),
        shard_size=shard_size,
        batch_size=batch_size,
        seed=seed,
        clip_denoised=clip_denoised,
    )
