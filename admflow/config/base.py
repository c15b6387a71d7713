"""What every config section shares: the error type and the strict pydantic base."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A preset or override that cannot become a valid config."""


class Section(BaseModel):
    # NaN/inf is never a meaningful setting (a NaN scale silently yields black images).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
