"""The one typed config of admflow.

Every stage takes an :class:`AdmConfig`. Presets live in ``configs/*.yaml``; a preset may
name another as ``base:`` and override parts of it. ``--set a.b=value`` overrides are
parsed as YAML scalars. Unknown keys, wrong types and impossible combinations fail here,
at load time, with the field's dotted path in the message.

The package, one job per module: ``base`` (the strict section base, :class:`ConfigError`),
``networks`` (UNet, classifier, upsampler), ``sections`` (data, diffusion, training,
evaluation), ``sampling`` (sampling and the respacing rules), ``runtime`` (storage,
tracking, compute), ``adm`` (:class:`AdmConfig` and its cross-section checks) and ``loading``
(presets, overrides, error messages). Import from ``admflow.config``.
"""

from __future__ import annotations

from admflow.config.adm import AdmConfig
from admflow.config.base import ConfigError, Section
from admflow.config.loading import (
    CONFIG_DIR,
    apply_overrides,
    config_from_dict,
    dump_config,
    list_presets,
    load_config,
    parse_override,
)
from admflow.config.networks import (
    ClassifierConfig,
    UNetConfig,
    UpsamplerConfig,
    default_channel_mult,
)
from admflow.config.runtime import ComputeConfig, StorageConfig, TrackingConfig
from admflow.config.sampling import SamplingConfig
from admflow.config.sections import (
    DataConfig,
    DiffusionConfig,
    EvaluationConfig,
    MemoryConfig,
    TrainingConfig,
)

__all__ = [
    "CONFIG_DIR",
    "AdmConfig",
    "ClassifierConfig",
    "ComputeConfig",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "EvaluationConfig",
    "MemoryConfig",
    "SamplingConfig",
    "Section",
    "StorageConfig",
    "TrackingConfig",
    "TrainingConfig",
    "UNetConfig",
    "UpsamplerConfig",
    "apply_overrides",
    "config_from_dict",
    "default_channel_mult",
    "dump_config",
    "list_presets",
    "load_config",
    "parse_override",
]
