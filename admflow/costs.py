"""The cost table (``admflow/costs.yaml``): what one network evaluation of each released
network costs per image on each device kind, and where each figure came from.

A sample set's cost is ``s/img/NFE × images × evaluations``; a guided network's figure holds
its classifier's gradient too (one per evaluation, as the guided sampler pays it). Figures are
written by the benchmarks (``benchmarks/released.py --write-costs`` on CPU,
``benchmarks/gpu.py --write-costs`` on a GPU); a row never measured is ``null``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TABLE = Path(__file__).with_name("costs.yaml")
DEVICES = ("cpu", "gpu")
HEADER = """\
# Seconds per image per network evaluation (s/img/NFE) of each released network, per device
# kind, with where each figure came from; read by admflow.costs. Rows are written by
# benchmarks/released.py --write-costs (cpu) and benchmarks/gpu.py --write-costs (gpu);
# null: not measured yet. A guided network's figure includes its classifier gradient.
"""


class CostTableError(ValueError):
    """A cost table that cannot be read as one."""


@dataclass(frozen=True)
class Cost:
    """One network on one device kind."""

    network: str
    device: str
    s_per_image_nfe: float
    peak_rss_gib: float | None = None
    peak_gpu_gib: float | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def hours(self, images: int, evaluations: int) -> float:
        """Device-hours for ``images`` images of ``evaluations`` network evaluations each."""
        return self.s_per_image_nfe * images * evaluations / 3600


def read_table(path: str | Path = TABLE) -> dict[str, Any]:
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("networks"), dict):
        raise CostTableError(f"{path}: expected a mapping with a 'networks' section")
    return raw


def load_costs(path: str | Path = TABLE) -> dict[str, dict[str, Cost | None]]:
    """Every network's cost per device kind (None where not measured)."""
    table: dict[str, dict[str, Cost | None]] = {}
    for name, entry in read_table(path)["networks"].items():
        table[name] = {d: _cost(name, d, entry.get(d), path) for d in DEVICES}
    return table


def _cost(name: str, device: str, row: Any, path: str | Path) -> Cost | None:
    if row is None:
        return None
    try:
        figure = float(row["s_per_image_nfe"])
    except (TypeError, KeyError, ValueError):
        raise CostTableError(f"{path}: {name}.{device} needs a number s_per_image_nfe") from None
    if not figure > 0:
        raise CostTableError(f"{path}: {name}.{device}.s_per_image_nfe must be > 0")
    return Cost(
        name,
        device,
        figure,
        row.get("peak_rss_gib"),
        row.get("peak_gpu_gib"),
        dict(row.get("source") or {}),
    )


def cost(network: str, device: str, path: str | Path = TABLE) -> Cost | None:
    """One row; a network missing from the table is an error, an unmeasured row None."""
    table = load_costs(path)
    if network not in table:
        raise CostTableError(f"{path}: no network {network!r} (has: {', '.join(table)})")
    if device not in DEVICES:
        raise CostTableError(f"device kind must be one of {DEVICES}, got {device!r}")
    return table[network][device]


def record(
    network: str, device: str, row: dict[str, Any], path: str | Path = TABLE
) -> dict[str, Any]:
    """Write ``row`` (s_per_image_nfe, peak memory, source) as ``network``'s ``device`` row."""
    raw = read_table(path)
    if device not in DEVICES:
        raise CostTableError(f"device kind must be one of {DEVICES}, got {device!r}")
    entry = raw["networks"].setdefault(network, {d: None for d in DEVICES})
    entry[device] = {**row, "source": {"date": datetime.date.today().isoformat(), **row["source"]}}
    _cost(network, device, entry[device], path)  # never write a row the loader refuses
    Path(path).write_text(HEADER + yaml.safe_dump(raw, sort_keys=False))
    return raw
