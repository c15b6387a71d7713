"""benchmarks/sample_scale.py --full at toy size: the same code path as the 50,000-image run
(the real `admflow sample` CLI killed half-way and rerun, the shard hashes before and after,
the uninterrupted redraw, the driver's RSS), on a freshly initialised demo network with a
3-step solver, so the script cannot rot between its hour-long runs. Scoring is left out here
(Inception over the demo's reference alone takes minutes on these CPUs); its subset file is
tested on its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.sample_scale import rss_ratio, write_subset
from tasks.sampling.files import decode_npz, encode_npz

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "sample_scale.py"


def test_rss_ratio_counts_from_a_tenth_of_what_the_run_draws():
    # (seconds, images done, RSS MiB); a first run from 0 of 5,000 images: 10% is 500
    first = [(0, 0, 50.0), (1, 0, 100.0), (2, 500, 120.0), (3, 2500, 132.0)]
    assert rss_ratio(first, 5000) == pytest.approx(1.1)
    # a rerun that starts at 2,500: its 10% mark is 2,750, so 140 at 2,600 is start-up
    rerun = [(0, 2500, 140.0), (1, 2600, 140.0), (2, 2750, 100.0), (3, 5000, 120.0)]
    assert rss_ratio(rerun, 5000) == pytest.approx(1.2)
    assert rss_ratio([], 5000) is None


def test_write_subset_takes_the_first_images_in_shard_order(tmp_path):
    shards = tmp_path / "set" / "shards"
    shards.mkdir(parents=True)
    for i in (2, 0, 1):  # written out of order, read in index order
        images = np.full((4, 2, 2, 3), i, dtype=np.uint8)
        (shards / f"samples-{i:05d}.npz").write_bytes(encode_npz(images, np.arange(4) + 10 * i))
    dest, n = write_subset(tmp_path / "set", 6, tmp_path / "subset.npz")
    assert n == 6
    images, labels = decode_npz(Path(dest).read_bytes())
    assert images.shape == (6, 2, 2, 3)
    assert images[:, 0, 0, 0].tolist() == [0, 0, 0, 0, 1, 1]
    assert labels.tolist() == [0, 1, 2, 3, 10, 11]


@pytest.mark.slow
@pytest.mark.ray
def test_full_run_at_toy_size(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--full", "--fresh-model", "--num-samples", "400",
           "--solver-steps", "3", "--score-samples", "0", "--interval", "0.5",
           "--workdir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["checks_hold"] and all(result["checks"].values()), result["checks"]
    # 8 shards of 50: killed once half were listed (a shard or two more may land before the
    # SIGKILL does), the rerun kept those and drew the rest
    done = result["kill"]["after_shards"]
    assert 4 <= done < 8, result["kill"]
    assert result["kill"]["listed_before_rerun"] == done
    assert result["rerun"]["shards_skipped"] == done
    assert result["rerun"]["shards_sampled"] == 8 - done
    assert result["rerun"]["complete"] is True
    # shards on both sides of the kill were redrawn and matched
    redrawn = sorted(int(name[8:13]) for name in result["redrawn"])
    assert redrawn[0] < done <= redrawn[-1]
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert sum(s["rows"] for s in manifest["shards"]) == 400
    assert result["driver_rss_mib"]["rerun"]["samples"] > 0
    assert result["disk_bytes"] > 400 * 16 * 16 * 3
    assert result["evaluate"] is None
