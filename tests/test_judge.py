"""The demo's judge (a small CNN) and the two-stage resizes, on inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.judge import fit_judge, holdout_split, judge_accuracy, judge_predict
from models.resize import upsample_bilinear_uint8


def _two_class_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: a bright vertical bar, class 1: a bright horizontal bar, random colours."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 80, size=(n, size, size, 3)).astype(np.uint8)
    for i, c in enumerate(labels):
        lo = int(rng.integers(2, size - 5))
        bar = (slice(None), slice(lo, lo + 3)) if c == 0 else (slice(lo, lo + 3), slice(None))
        images[i][bar] = rng.integers(170, 256, size=3)
    return images, labels


def test_judge_learns_shapes_and_reads_larger_images_at_its_own_size():
    train_x, train_y = _two_class_images(128, 16, seed=0)
    test_x, test_y = _two_class_images(64, 16, seed=1)
    model = fit_judge(train_x, train_y, num_classes=2, steps=60, seed=0)
    assert judge_accuracy(model, test_x, test_y) >= 0.95
    assert judge_accuracy(model, test_x, 1 - test_y) <= 0.05  # wrong labels score as wrong
    big = test_x.repeat(2, axis=1).repeat(2, axis=2)  # an upsampler's 32px output
    seen = []  # what each network is given: bars read at any size, so check the size itself
    hooks = [
        m.register_forward_pre_hook(lambda _, a: seen.append(a[0].shape)) for m in model.members
    ]
    assert judge_accuracy(model, big, test_y) >= 0.95
    for h in hooks:
        h.remove()
    assert seen and all(tuple(s[1:]) == (3, 16, 16) for s in seen), seen
    again = fit_judge(train_x, train_y, num_classes=2, steps=60, seed=0)  # deterministic
    np.testing.assert_array_equal(judge_predict(again, test_x), judge_predict(model, test_x))


def test_the_judge_averages_the_probabilities_of_members_trained_from_different_seeds():
    x, y = _two_class_images(128, 16, seed=0)
    model = fit_judge(x, y, num_classes=2, members=3, steps=20, seed=5)
    first, second = model.members[0], model.members[1]
    assert not torch.equal(first.net[0][0].weight, second.net[0][0].weight)
    alone = fit_judge(x, y, num_classes=2, members=1, steps=20, seed=6)  # member 1's seed
    assert torch.equal(alone.members[0].net[0][0].weight, second.net[0][0].weight)
    inputs = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        mean = sum(F.softmax(m(inputs), 1) for m in model.members) / 3
        np.testing.assert_allclose(model(inputs).exp().numpy(), mean.numpy(), rtol=1e-5)


def test_judge_rejects_labels_outside_its_classes():
    x, y = _two_class_images(8, 16, seed=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit_judge(x, y + 1, num_classes=2, steps=1)


def test_holdout_split_is_disjoint_and_fixed():
    train, held = holdout_split(200, 0.25, seed=0)
    assert len(held) == 50 and len(train) == 150 and not set(train) & set(held)
    np.testing.assert_array_equal(held, holdout_split(200, 0.25, seed=0)[1])


def test_bilinear_upscale_is_the_upsamplers_own_resize():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    up = upsample_bilinear_uint8(images, 16)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1
    ref = F.interpolate(x, size=(16, 16), mode="bilinear")  # what SuperResModel applies
    ref = ((ref + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert up.shape == (3, 16, 16, 3) and up.dtype == np.uint8
    np.testing.assert_array_equal(up, ref)
    nearest = images.repeat(2, axis=1).repeat(2, axis=2)
    assert np.abs(up.astype(int) - nearest.astype(int)).mean() > 5  # not nearest-neighbour


def _write_set(out: str, images: np.ndarray, labels: np.ndarray) -> None:
    from admflow import storage
    from tasks.sampling import files as sample_io

    data = sample_io.encode_npz(images, labels)
    storage.write_bytes(sample_io.shard_uri(out, 0), data)
    manifest = sample_io.new_manifest(len(images), images.shape[1], len(images), "f" * 20)
    entry = {"index": 0, "name": sample_io.shard_name(0), "rows": len(images)}
    manifest["shards"] = [{**entry, "sha256": storage.sha256_bytes(data)}]
    manifest["complete"] = True
    sample_io.write_manifest(out, manifest)


def test_a_bilinear_set_is_judged_on_the_base_set_it_was_made_from(tmp_path):
    import io

    from admflow import storage
    from tasks.sampling.bilinear import bilinear_set
    from tasks.scoring.judge import class_accuracy, judged_set

    x, y = _two_class_images(64, 16, seed=1)
    base, up = str(tmp_path / "base"), str(tmp_path / "up")
    _write_set(base, x, y)
    bilinear_set(base, up, 32)
    assert judged_set(up) == base and judged_set(base) == base

    model = fit_judge(*_two_class_images(128, 16, seed=0), num_classes=2, steps=60, seed=0)
    judge = str(tmp_path / "judge")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    storage.write_bytes(judge + ".pt", buf.getvalue())
    storage.write_json(
        judge + ".json", {"num_classes": 2, "judge_image_size": 16, "judge_members": 4}
    )
    acc = class_accuracy(judge, up)
    assert acc == class_accuracy(judge, base) == judge_accuracy(model, x, y) >= 0.95
    _write_set(base, x, 1 - y)  # the base set's labels are what the bilinear row is judged by
    assert class_accuracy(judge, up) <= 0.05


def test_a_sample_sets_sharpness_is_matched_on_the_judges_softening_ladder(tmp_path):
    import io

    from admflow import storage
    from models.judge import image_sharpness, match_softness, softening_ladder
    from tasks.scoring.judge import judge_reading

    model = fit_judge(*_two_class_images(128, 16, seed=0), num_classes=2, steps=60, seed=0)
    held_x, held_y = _two_class_images(32, 16, seed=2)
    ladder = softening_ladder(model, held_x, held_y, levels=11)
    assert ladder[0]["accuracy"] == judge_accuracy(model, held_x, held_y)
    assert all(a["sharpness"] > b["sharpness"] for a, b in zip(ladder, ladder[1:], strict=False))
    judge = str(tmp_path / "judge")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    storage.write_bytes(judge + ".pt", buf.getvalue())
    storage.write_json(judge + ".json", {"num_classes": 2, "judge_image_size": 16,
                                         "judge_members": 4, "judge_softening": ladder})  # fmt: skip
    x, y = _two_class_images(16, 16, seed=1)
    soft = ((x.astype(np.float32) - 40) * 0.5 + 40).astype(np.uint8)  # half the contrast
    samples = str(tmp_path / "samples")
    _write_set(samples, soft, y)
    reading = judge_reading(judge, samples)
    sharpness = float(image_sharpness(soft, 16).mean())
    assert reading["sharpness"] == pytest.approx(sharpness, rel=1e-6)
    assert sharpness < ladder[0]["sharpness"]  # softer than the real images
    assert reading["softened_real"] == match_softness(ladder, reading["sharpness"])
    assert reading["softened_real_accuracy"] == reading["softened_real"]["accuracy"]
    assert reading["class_accuracy"] == judge_accuracy(model, soft, y)
