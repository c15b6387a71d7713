"""Evaluator: metric definitions against closed forms, Inception preprocessing and features
against independent references, input formats, caching, Ray extraction, CLI and MLflow."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch

from admflow import storage
from admflow.config import load_config
from models import inception as inc
from models import metrics as M
from tasks.scoring import evaluate as ev
from tasks.scoring import features as fe
from tasks.scoring.inputs import EvaluationInputError, describe, read_npz_rows
from tests.priority import threads_per_worker

RNG = np.random.default_rng(1234)


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def model() -> inc.InceptionV3:
    torch.set_num_threads(threads_per_worker() or 2)
    return inc.load_inception()


@pytest.fixture
def cfg(tmp_path):
    return load_config(
        "tiny",
        [
            f"storage.root={tmp_path / 'store'}",
            "evaluation.workers=0",
            "evaluation.fid_method=eigh",
        ],
    )


# ------------------------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    a = RNG.normal(size=(400, 24)).astype(np.float32)
    b = (RNG.normal(size=(300, 24)) * 1.5 + 0.3).astype(np.float32)
    sa, sb = M.feature_statistics(a), M.feature_statistics(b)
    assert sa[0].dtype == np.float32 and sa[1].dtype == np.float64  # as the evaluator
    assert abs(M.frechet_distance(*sa, *sa)) < 1e-8
    ab, ba = M.frechet_distance(*sa, *sb), M.frechet_distance(*sb, *sa)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-9)


def test_fast_frechet_trace_matches_the_evaluators_sqrtm():
    rng = np.random.default_rng(3)
    for dim, n in ((64, 500), (64, 40)):  # full rank and rank-deficient covariances
        a, b = rng.normal(size=(n, dim)), rng.normal(size=(n, dim)) * 1.3 + 0.2
        sa, sb = M.feature_statistics(a), M.feature_statistics(b)
        exact = M.frechet_distance(*sa, *sb, method="sqrtm")
        fast = M.frechet_distance(*sa, *sb, method="eigh")
        assert fast == pytest.approx(exact, rel=1e-6, abs=1e-6)
        # from the features: fewer of them than dimensions take the N×N route
        assert M.frechet_distance_to_features(*sa, b, "eigh") == pytest.approx(exact, rel=1e-6)
        assert M.frechet_distance_to_features(*sa, b, "sqrtm") == exact


def test_few_samples_need_no_decomposition_of_the_feature_dimension():
    """100 samples against 2048-d statistics: the same distance as the D×D route, to float64
    rounding (the speed: benchmarks/evaluate.py)."""
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(300, 2048)) * rng.uniform(0.5, 2.0, 2048)
    smp = (rng.normal(size=(100, 2048)) * 1.3 + 0.2).astype(np.float32)
    sr = M.feature_statistics(ref)
    full = M.frechet_distance(*M.feature_statistics(smp), *sr, method="eigh")
    assert M.frechet_distance_to_features(*sr, smp, "eigh") == pytest.approx(full, rel=1e-7)
    with pytest.raises(M.MetricError, match="different dimension"):
        M.frechet_distance_to_features(*sr, smp[:, :64], "eigh")


def test_fid_of_two_gaussians_equals_the_closed_form():
    d = 16
    q, _ = np.linalg.qr(RNG.normal(size=(d, d)))
    l1, l2 = RNG.uniform(0.2, 2.0, d), RNG.uniform(0.2, 2.0, d)
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T  # commuting covariances
    m1, m2 = RNG.normal(size=d), RNG.normal(size=d)
    closed = np.sum((m1 - m2) ** 2) + np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
    assert M.frechet_distance(m1, s1, m2, s2) == pytest.approx(closed, rel=1e-9)
    # and from samples: statistics of 20k draws land near the closed form
    x = RNG.multivariate_normal(m1, s1, size=20000).astype(np.float32)
    y = RNG.multivariate_normal(m2, s2, size=20000).astype(np.float32)
    est = M.frechet_distance(*M.feature_statistics(x), *M.feature_statistics(y))
    assert est == pytest.approx(closed, rel=0.03)


def test_running_statistics_equal_np_cov():
    a = RNG.normal(size=(500, 8)).astype(np.float32) + 3
    rs = M.RunningStatistics(8)
    for i in range(0, 500, 64):
        rs.update(a[i : i + 64])
    mu, sigma = rs.result()
    np.testing.assert_allclose(mu, a.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False), rtol=1e-9, atol=1e-12)


def test_too_few_features_and_mismatched_dimensions_fail_clearly():
    with pytest.raises(M.MetricError, match="at least 2"):
        M.feature_statistics(np.zeros((1, 2048), np.float32))
    with pytest.raises(M.MetricError, match="at least 4"):
        M.precision_recall(np.zeros((3, 8), np.float32), np.zeros((9, 8), np.float32))
    with pytest.raises(M.MetricError, match="different dimension"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------- IS and P/R


def test_inception_score_of_uniform_and_of_confident_spread_predictions():
    uniform = np.full((100, 1008), 1 / 1008, np.float32)
    assert M.inception_score(uniform) == pytest.approx(1.0, abs=1e-5)
    logits = np.zeros((1000, 10), np.float32)
    logits[np.arange(1000), np.arange(1000) % 10] = 60.0
    assert M.inception_score(M.softmax(logits)) == pytest.approx(10.0, rel=1e-5)


def test_inception_score_counts_the_last_partial_split():
    logits = np.zeros((12000, 10), np.float32)
    logits[np.arange(10000), np.arange(10000) % 10] = 60.0  # two splits of 10 classes
    logits[np.arange(10000, 12000), np.arange(2000) % 2] = 60.0  # last 2000: 2 classes
    assert M.inception_score(M.softmax(logits)) == pytest.approx((10 + 10 + 2) / 3, rel=1e-5)


def test_precision_recall_of_a_set_with_itself_is_one_and_falls_when_shifted():
    a = RNG.normal(size=(600, 32)).astype(np.float32)
    assert M.precision_recall(a, a, block=250) == (1.0, 1.0)
    p, r = M.precision_recall(a, a + 2.0)
    assert p < 0.2 and r < 0.2
    b = a.copy()
    b[:300] += 3.0  # half the samples leave the manifold, the other half stays
    p, r = M.precision_recall(a, b)
    # precision: the shifted half is off the reference manifold; recall: the half left behind
    # has sparser neighbours, so its radii grow and cover most of the reference (0.82-0.88)
    assert 0.45 < p < 0.6 and 0.78 < r < 0.92


def test_radii_are_third_neighbour_distances_and_blocking_does_not_change_them():
    x = RNG.normal(size=(300, 16)).astype(np.float32)
    x16 = x.astype(np.float16).astype(np.float64)
    d = ((x16[:, None] - x16[None]) ** 2).sum(-1)
    expect = np.sort(d, axis=1)[:, 3]  # index 0 is the point itself
    np.testing.assert_allclose(M.manifold_radii(x), expect, rtol=2e-3)
    np.testing.assert_array_equal(M.manifold_radii(x, block=70), M.manifold_radii(x))


def test_fp16_overflow_falls_back_to_fp32():
    u = torch.full((2, 4), 300.0)  # squared norms 360000 overflow fp16
    d = M.pairwise_sq_distances(u, torch.zeros(3, 4))
    assert torch.isfinite(d).all() and d[0, 0].item() == pytest.approx(360000.0)


# ------------------------------------------------------------------ inputs and files


def test_reference_npz_layout_is_read_with_its_statistics(cfg, tmp_path):
    ref = _npz(
        tmp_path / "VIRTUAL_ref.npz",
        arr_0=_images(5, 32, seed=1),
        mu=np.full(2048, 0.5),
        sigma=np.eye(2048) * 0.1,
        mu_s=np.full(2023, 0.2),
        sigma_s=np.eye(2023) * 0.1,
    )
    info = describe(ref)
    assert info["kind"] == "images" and info["has_stats"] and info["num_images"] == 5
    feats, cache_uri = fe.features_for(cfg, ref)
    assert feats["pool"].shape == (5, 2048) and float(feats["mu"][0]) == 0.5
    assert cache_uri.startswith(str(tmp_path / "store" / "eval-cache"))
    rows = read_npz_rows(ref, "arr_0", 2, 4)
    np.testing.assert_array_equal(rows, _images(5, 32, seed=1)[2:4])


def test_feature_file_round_trip_and_cache_reuse(cfg, tmp_path, monkeypatch):
    samples = _npz(tmp_path / "samples.npz", arr_0=_images(4, 32, seed=2))
    feats, cache_uri = fe.features_for(cfg, samples)
    out = str(tmp_path / "feats.npz")
    fe.save_features(out, feats)
    again = fe.load_features(out)
    assert sorted(again) == sorted(feats)
    for k in feats:
        np.testing.assert_array_equal(again[k], feats[k])
    monkeypatch.setattr(fe, "stream_features", lambda *a, **k: pytest.fail("not cached"))
    cached, uri = fe.features_for(cfg, samples)
    assert uri == cache_uri
    np.testing.assert_array_equal(cached["pool"], feats["pool"])


def test_bad_inputs_fail_with_clear_messages(cfg, tmp_path):
    floats = _npz(tmp_path / "f.npz", arr_0=np.zeros((3, 8, 8, 3), np.float32))
    with pytest.raises(EvaluationInputError, match="uint8"):
        describe(floats)
    nchw = _npz(tmp_path / "c.npz", arr_0=np.zeros((3, 3, 8, 8), np.uint8))
    with pytest.raises(EvaluationInputError, match=r"\[N, H, W, 3\]"):
        describe(nchw)
    with pytest.raises(EvaluationInputError, match="neither arr_0"):
        describe(_npz(tmp_path / "x.npz", foo=np.zeros(3)))
    with pytest.raises(EvaluationInputError, match="not an .npz"):
        describe(str(tmp_path / "nothing"))
    feats = {"pool": RNG.normal(size=(6, 2048)).astype(np.float32),
             "spatial": RNG.normal(size=(6, 2023)).astype(np.float32)}  # fmt: skip
    with pytest.raises(EvaluationInputError, match="64px but samples are 32px"):
        ev.compute_metrics({**feats, "image_size": 64}, {**feats, "image_size": 32})
    with pytest.raises(M.MetricError, match="at least 2"):
        ev.compute_metrics(feats, {k: v[:1] for k, v in feats.items()})
    bad = str(tmp_path / "bad_feats.npz")
    fe.save_features(bad, {"pool": np.zeros((3, 100)), "spatial": np.zeros((3, 2023))})
    with pytest.raises(EvaluationInputError, match=r"pool must be \[N, 2048\]"):
        fe.load_features(bad)


def _write_shards(root, n_per_shard: list[int], size: int = 16) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    shards, k = [], 0
    for s, n in enumerate(n_per_shard):
        blobs = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(_images(1, size, seed=100 + k)[0]).save(buf, format="PNG")
            blobs.append(buf.getvalue())
            k += 1
        name = f"shard-{s:05d}.parquet"
        table = pa.table({"image": blobs, "label": [-1] * n, "key": [str(i) for i in range(n)]})
        (root / "shards").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / "shards" / name)
        shards.append({"name": name, "rows": n, "sha256": "x"})
    manifest = {"format": "admflow-shards/1", "image_size": size, "num_images": k,
                "num_classes": None, "shards": shards}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def test_reference_from_a_sharded_data_set_keeps_stats_of_all_and_a_subset(cfg, tmp_path, model):
    data = _write_shards(tmp_path / "data", [3, 3])
    evaluation = {"reference_images": 4, "reference_statistics": "all"}
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update=evaluation)})
    uri = fe.build_reference(cfg, data)
    ref = fe.load_features(uri)
    assert ref["pool"].shape == (4, 2048) and int(ref["num_images"]) == 6
    every = np.concatenate([_images(1, 16, seed=100 + k) for k in range(6)])
    direct = model.features(every)
    np.testing.assert_allclose(ref["mu"], direct["pool"].astype(np.float64).mean(0), atol=1e-5)
    np.testing.assert_allclose(ref["sigma"], np.cov(direct["pool"], rowvar=False), atol=1e-5)
    assert ref["sigma_s"].shape == (2023, 2023)


def test_a_reference_with_statistics_of_the_kept_images_reads_only_those(
    cfg, tmp_path, model, monkeypatch
):
    data = _write_shards(tmp_path / "data", [3, 3])
    evaluation = {"reference_images": 4, "reference_statistics": "kept"}
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update=evaluation)})
    seen = []
    features = fe.FeatureWorker.run

    def counting(self, index, unit, rows=None):
        out = features(self, index, unit, rows)
        seen.append(len(out[1].get("pool", [])))
        return out

    monkeypatch.setattr(fe.FeatureWorker, "run", counting)
    ref = fe.load_features(fe.build_reference(cfg, data))
    assert sum(seen) == 4 and ref["pool"].shape == (4, 2048)  # 4 of 6 images through Inception
    every = np.concatenate([_images(1, 16, seed=100 + k) for k in range(6)])
    chosen = np.sort(np.random.default_rng(0).choice(6, size=4, replace=False))
    direct = model.features(every[chosen])
    np.testing.assert_allclose(ref["pool"], direct["pool"], atol=1e-4)
    np.testing.assert_allclose(ref["mu"], direct["pool"].astype(np.float64).mean(0), atol=1e-5)
    np.testing.assert_allclose(ref["sigma"], np.cov(direct["pool"], rowvar=False), atol=1e-5)


# ------------------------------------------------------------------- CLI and MLflow


def test_cli_evaluate_prints_the_evaluator_lines_and_json(cfg, tmp_path, capsys):
    from admflow.cli import main

    ref = _npz(tmp_path / "ref.npz", arr_0=_images(5, 32, seed=7))
    smp = _npz(tmp_path / "smp.npz", arr_0=_images(5, 32, seed=8))
    common = ["--workers", "0", "--set", "evaluation.fid_method=eigh"]
    common += ["--set", f"storage.root={tmp_path / 'store'}", "--no-mlflow"]
    assert main(["evaluate", ref, smp, *common]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == [
        "Inception Score", "FID", "sFID", "Precision", "Recall",
    ]  # fmt: skip
    assert "unavailable" in lines[0]
    feats_out = str(tmp_path / "smp_feats.npz")
    assert main(["features", smp, feats_out, *common[:-1]]) == 0
    capsys.readouterr()
    assert main(["evaluate", ref, feats_out, "--json", *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["inception_score"] is None
    # the numbers of these two sets, recomputed here from the features of the files named
    ref_pool = fe.features_for(cfg, ref)[0]["pool"]
    smp_pool = fe.load_features(feats_out)["pool"]
    assert ref_pool.shape == smp_pool.shape == (5, 2048)
    stats = (*M.feature_statistics(smp_pool), *M.feature_statistics(ref_pool))
    fid = M.frechet_distance(*stats, method="eigh")  # as configured above (sqrtm: ~17 s more)
    assert out["fid"] == pytest.approx(fid, rel=1e-6) and out["fid"] > 1.0
    assert float(lines[1].split(":")[1]) == pytest.approx(fid, rel=1e-6)  # the printed line
    precision, recall = M.precision_recall(ref_pool, smp_pool)
    assert (out["precision"], out["recall"]) == (precision, recall)
    same = ev.evaluate_sets(cfg, smp, feats_out, log_mlflow=False)  # npz vs its feature file
    assert abs(same["fid"]) < 1e-3 and same["precision"] == 1.0 and same["recall"] == 1.0
    assert main(["evaluate", str(tmp_path / "nope.npz"), smp, *common]) == 2


def test_evaluate_logs_metrics_and_lineage_to_mlflow(cfg, tmp_path):
    import mlflow

    def feats(shift):
        return {"pool": RNG.normal(size=(20, 2048)).astype(np.float32) + shift,
                "spatial": RNG.normal(size=(20, 2023)).astype(np.float32),
                "logits": RNG.normal(size=(20, 1008)).astype(np.float32)}  # fmt: skip

    ref, smp = str(tmp_path / "r.npz"), str(tmp_path / "s.npz")
    fe.save_features(ref, feats(0.0))
    fe.save_features(smp, feats(0.1))
    out = ev.evaluate_sets(cfg, ref, smp, tags={"admflow.upstream.samples": "x"})
    run = mlflow.get_run(out["mlflow_run_id"])
    assert run.data.metrics["fid"] == pytest.approx(out["fid"])
    assert run.data.metrics["inception_score"] == pytest.approx(out["inception_score"])
    assert run.data.tags["admflow.reference"] == ref and run.data.tags["admflow.samples"] == smp
    contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
    assert contexts == ["reference", "samples"]


# ------------------------------------------------------------------------------- Ray


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_ray_extraction_equals_local(ray_session, cfg, tmp_path):
    base = tmp_path / "set"
    (base / "shards").mkdir(parents=True)
    shards = []
    for i in range(3):
        name = f"samples-{i:05d}.npz"
        np.savez(base / "shards" / name, arr_0=_images(2, 32, seed=20 + i), arr_1=np.zeros(2))
        shards.append({"name": name, "rows": 2, "sha256": "x", "index": i})
    manifest = {"format": "admflow-samples/1", "num_samples": 6, "image_size": 32,
                "shards": shards}  # fmt: skip
    (base / "manifest.json").write_text(json.dumps(manifest))
    local, _ = fe.features_for(cfg, str(base), workers=0, use_cache=False)
    remote, _ = fe.features_for(cfg, str(base), workers=2, use_cache=False)
    assert remote["pool"].shape == (6, 2048)
    np.testing.assert_allclose(remote["pool"], local["pool"], atol=1e-5)
    np.testing.assert_allclose(remote["spatial"], local["spatial"], atol=1e-5)
    assert storage.exists(str(base / "manifest.json"))
    # Inside keep_warm a second extraction runs on the first one's Inception actors, with the
    # same features; a failed one ends the pool, so the next starts its own
    from tasks.runtime.warm import keep_warm

    with keep_warm() as pools:
        first, _ = fe.features_for(cfg, str(base), workers=2, use_cache=False)
        second, _ = fe.features_for(cfg, str(base), workers=2, use_cache=False)
        assert (pools.started, pools.reused) == (1, 1)
        shutil.copytree(base, tmp_path / "bad")
        (tmp_path / "bad" / "shards" / "samples-00001.npz").write_bytes(b"not an npz")
        with pytest.raises(Exception, match="samples-00001"):
            fe.features_for(cfg, str(tmp_path / "bad"), workers=2, use_cache=False)
        fe.features_for(cfg, str(base), workers=2, use_cache=False)
        assert (pools.started, pools.reused) == (2, 2)
    for feats in (first, second):
        np.testing.assert_array_equal(feats["pool"], remote["pool"])
        np.testing.assert_array_equal(feats["spatial"], remote["spatial"])
