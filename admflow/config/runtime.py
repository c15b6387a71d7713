"""Where a run keeps its files and metrics, and where it runs: storage, tracking, compute."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator

from admflow.config.base import Section


def _default_root() -> str:
    return os.environ.get("ADMFLOW_STORAGE_ROOT", "./admflow-store")


class StorageConfig(Section):
    root: str = Field(
        default_factory=_default_root,
        validate_default=True,
        description="local dir, file:// or s3://bucket/prefix (default $ADMFLOW_STORAGE_ROOT)",
    )
    create_bucket: bool = Field(False, description="create a missing S3 bucket (else an error)")

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: str) -> str:
        from admflow.uris import check_uri_form

        check_uri_form(v)  # S3://, s3:/, s3a://, gs:// without gcsfs: refused
        # Ray workers run in other directories: a relative local root must not depend on cwd.
        if "://" in v and not v.startswith("file://"):
            return v
        return os.path.abspath(v.removeprefix("file://"))


class TrackingConfig(Section):
    tracking_uri: str | None = Field(None, description="default: sqlite under storage-local dir")
    experiment: str = "admflow"
    register_models: bool = True

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials_kept(cls, v: str | None) -> str | None:
        # user:password@ in the URI moves into MLflow's credential variables of this process,
        # so the config (MLflow params, meta.json, Ray's train config) never holds it.
        from admflow.uris import tracking_uri_without_credentials

        return tracking_uri_without_credentials(v) if v else v


class ComputeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ray_address: str | None = Field(
        default_factory=lambda: os.environ.get("RAY_ADDRESS"),
        description="Ray cluster address; default $RAY_ADDRESS, else start local Ray",
    )
    num_workers: int = Field(2, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    gpus_per_actor: float | None = Field(
        None,
        gt=0,
        le=1,
        description="GPU share of each sampling and scoring actor (default: the cluster's GPUs "
        "spread evenly over the actors)",
    )
    local_cpus: int | None = Field(
        None,
        gt=0,
        description="logical CPUs of the local Ray (default: this machine's, at least 2)",
    )
    local_gpus: int | None = Field(
        None,
        ge=0,
        description="logical GPUs of the local Ray (default: the CUDA devices torch sees); with "
        "device: cpu they reserve GPUs in Ray while torch stays on the CPU",
    )
    object_store_gib: float | None = Field(
        None,
        gt=0,
        description="object store of the local Ray in GiB (default: a fifth of the memory, "
        "1 to 8 GiB: room for the largest weights and a few shards of results)",
    )
    torch_threads: int = Field(1, gt=0)
    diffusion_threads: int | None = Field(
        None,
        gt=0,
        description="threads of each diffusion-training worker (default torch_threads): the "
        "long pole may use cores that idle once the shorter trainings are done",
    )

    def threads_for(self, kind: str) -> int:
        """Torch threads of a training worker of ``kind``."""
        if kind == "diffusion" and self.diffusion_threads:
            return self.diffusion_threads
        return self.torch_threads
