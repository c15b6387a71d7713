"""The cost table ships with the package, reads as costs, and takes a benchmark's row."""

from __future__ import annotations

import shutil

import pytest

from admflow import costs
from admflow.config import load_config

NETWORKS = {"imagenet64", "imagenet256", "upsampler64-256", "tiny"}


def test_the_shipped_table_names_every_released_network_and_its_preset():
    table = costs.load_costs()
    assert NETWORKS <= set(table)
    raw = costs.read_table()["networks"]
    for name in NETWORKS:
        assert set(table[name]) == set(costs.DEVICES)
        load_config(raw[name]["preset"])  # each row names a preset that exists
    assert raw["imagenet256"]["classifier"] == "classifier256"  # ADM-G: guided


def test_a_recorded_row_reads_back_with_its_source_and_hours(tmp_path):
    path = tmp_path / "costs.yaml"
    shutil.copy(costs.TABLE, path)
    row = {
        "s_per_image_nfe": 0.5,
        "peak_rss_gib": 1.25,
        "source": {"script": "benchmarks/released.py", "cpu": "some CPU"},
    }
    costs.record("imagenet64", "cpu", row, path)
    got = costs.cost("imagenet64", "cpu", path)
    assert got is not None and got.s_per_image_nfe == 0.5 and got.peak_rss_gib == 1.25
    assert got.source["cpu"] == "some CPU" and len(got.source["date"]) == 10
    assert got.hours(50_000, 250) == pytest.approx(0.5 * 50_000 * 250 / 3600)
    assert costs.cost("imagenet64", "gpu", path) is None  # untouched rows stay
    assert path.read_text().startswith(costs.HEADER)


def test_bad_tables_and_names_fail_with_the_reason(tmp_path):
    path = tmp_path / "costs.yaml"
    path.write_text("networks:\n  x: {cpu: {s_per_image_nfe: -1}, gpu: null}\n")
    with pytest.raises(costs.CostTableError, match="must be > 0"):
        costs.load_costs(path)
    with pytest.raises(costs.CostTableError, match="no network 'nope'"):
        costs.cost("nope", "cpu")
    with pytest.raises(costs.CostTableError, match="device kind"):
        costs.cost("tiny", "tpu")
    with pytest.raises(costs.CostTableError, match="needs a number"):
        costs.record("tiny", "cpu", {"source": {}}, tmp_path / "costs.yaml")
