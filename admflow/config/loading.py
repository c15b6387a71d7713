"""Presets, ``base:`` chains, ``--set`` overrides and readable validation errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from admflow.config.adm import AdmConfig
from admflow.config.base import ConfigError

# The presets: configs/ in the repository, shipped in the package as admflow/presets (a link).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_preset(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(
            f"preset {name_or_path!r} not found; known presets: {', '.join(list_presets())}"
        )
    if str(path) in seen:
        raise ConfigError(f"preset {path} includes itself through 'base:'")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ConfigError(
            f"preset {path}: YAML syntax error{where}: {problem}; fix the file "
            "(indent with spaces, not tabs)"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {path} must be a mapping at top level")
    base = raw.pop("base", None)
    if base:
        raw = _deep_merge(_read_preset(base, seen + (str(path),)), raw)
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = _section_fields(e["loc"][:-1])
            msg = f"unknown key; allowed keys here: {', '.join(parent)}"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        msg = msg.removeprefix("Value error, ")
        # Cross-field checks name their fields in the message themselves.
        lines.append(f"  {msg}" if loc == "<root>" else f"  {loc}: {msg}")
    return "\n".join(lines)


def _section_fields(loc: tuple) -> list[str]:
    model: Any = AdmConfig
    for part in loc:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))


def config_from_dict(raw: dict, source: str = "dict") -> AdmConfig:
    try:
        return AdmConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(preset: str = "tiny", overrides: list[str] | None = None) -> AdmConfig:
    """Load a preset (name in ``configs/`` or a YAML path) and apply ``a.b=value`` overrides."""
    raw = _read_preset(preset)
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source=f"preset {preset!r}")


def dump_config(cfg: AdmConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
