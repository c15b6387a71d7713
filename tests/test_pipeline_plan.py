"""The reproduce flow's plan, decided without Prefect or Ray: which sets are drawn, which
are upsampled and scaled bilinearly, which references and yardsticks are built, which
checkpoints the FID curve scores, and the stage keys known before training; and that the
reproduce flow executes the plan as it stands (stand-in stages, no flow run)."""

from __future__ import annotations

import pytest

from admflow.config import load_config
from admflow.paper import load_rows
from tasks.plan import SetPlan, plan_reproduce


def test_the_demo_plan():
    plan = plan_reproduce(load_config("tiny"))
    assert plan.two_stage and plan.trainings == ("diffusion", "classifier", "upsampler")
    # the sweep at 16px; the most guided set also to 32px by the upsampler and bilinearly
    assert plan.sets == (
        SetPlan(0.0, guided=False, upsample=False, bilinear=False),
        SetPlan(8.0, guided=True, upsample=False, bilinear=False),
        SetPlan(32.0, guided=True, upsample=False, bilinear=False),
        SetPlan(128.0, guided=True, upsample=True, bilinear=True),
    )
    assert plan.judge and plan.floor and plan.curve
    assert plan.curve_reuses_unguided  # the curve's last point is the unguided sweep row
    assert plan.reference_workers == 1
    # two resolutions: two data sets and two references, every key its own
    assert len(set(plan.keys.values())) == len(plan.keys) == 10


@pytest.mark.parametrize(
    "override, field, value",
    [
        ("sampling.upsample_sets=all", "upsampled", [0.0, 8.0, 32.0, 128.0]),
        ("sampling.upsample_sets=extremes", "upsampled", [0.0, 128.0]),
        ("upsampler.enabled=false", "upsampled", []),
        ("evaluation.checkpoint_samples=0", "curve", False),
        ("evaluation.checkpoint_samples=50", "curve_reuses_unguided", False),
        ("sampling.classifier_scales=[8.0]", "curve_reuses_unguided", False),
        ("evaluation.workers=6", "reference_workers", 3),
    ],
)
def test_the_plan_follows_the_config(override, field, value):
    plan = plan_reproduce(load_config("tiny", [override]))
    if field == "upsampled":
        assert [s.scale for s in plan.sets if s.upsample] == value
    else:
        assert getattr(plan, field) == value


def test_sampling_settings_leave_the_upstream_keys_alone():
    keys = plan_reproduce(load_config("tiny")).keys
    for override in (
        "sampling.classifier_scales=[0.0, 3.0, 8.0, 32.0, 128.0]",
        "sampling.workers=5",
        "sampling.upsample_sets=all",
        "sampling.eta=0.5",
    ):
        again = plan_reproduce(load_config("tiny", [override])).keys
        assert again == keys, override
    trained = plan_reproduce(load_config("tiny", ["training.steps=7"])).keys
    assert trained["data"] == keys["data"] and trained["reference"] == keys["reference"]
    assert trained["train.diffusion"] != keys["train.diffusion"]
    assert trained["curve"] != keys["curve"]


@pytest.mark.parametrize(
    "override, retrained",
    [
        ("training.upsampler_steps=7", {"upsampler"}),
        ("training.upsampler_crop=8", {"upsampler"}),
        ("training.classifier_lr=0.01", {"classifier"}),
        ("training.classifier_steps=7", {"classifier"}),
        ("training.lr=0.01", {"diffusion", "classifier", "upsampler"}),
        ("training.seed=3", {"diffusion", "classifier", "upsampler"}),
        ("training.log_every=3", set()),
    ],
)
def test_a_training_field_retrains_only_the_jobs_that_read_it(override, retrained):
    keys = plan_reproduce(load_config("tiny")).keys
    again = plan_reproduce(load_config("tiny", [override])).keys
    changed = {k.split(".")[1] for k in keys if k.startswith("train.") and again[k] != keys[k]}
    assert changed == retrained, override


def test_execution_settings_reuse_every_stage_and_content_settings_do_not():
    keys = plan_reproduce(load_config("tiny")).keys
    for override in ("evaluation.workers=6", "evaluation.batch_size=7", "compute.torch_threads=2"):
        assert plan_reproduce(load_config("tiny", [override])).keys == keys, override
    # no judge: no class-accuracy column, every stage's key the same
    unjudged = plan_reproduce(load_config("tiny", ["evaluation.judge=false"]))
    assert not unjudged.judge and unjudged.keys == keys
    images = plan_reproduce(load_config("tiny", ["evaluation.reference_images=100"])).keys
    assert images["reference"] != keys["reference"] and images["data"] == keys["data"]


def test_one_stage_plan_has_one_resolution():
    plan = plan_reproduce(load_config("tiny", ["upsampler.enabled=false"]))
    assert not plan.two_stage and not plan.floor
    assert plan.trainings == ("diffusion", "classifier")
    assert plan.keys["up_data"] == plan.keys["data"]
    assert plan.keys["up_reference"] == plan.keys["reference"]
    assert not any(s.upsample or s.bilinear for s in plan.sets)


def test_a_paper_row_plan():
    row = load_rows().row("imagenet256-adm-g-adm-u")
    plan = plan_reproduce(load_config(row.preset, row.overrides()))
    assert plan.two_stage and plan.trainings == ("diffusion", "classifier", "upsampler")
    assert plan.sets == (SetPlan(1.0, guided=True, upsample=True, bilinear=True),)
    assert plan.judge and plan.floor and not plan.curve
    given = load_config("imagenet128", ["evaluation.reference=VIRTUAL_imagenet128_labeled.npz"])
    plan = plan_reproduce(given)
    assert not plan.two_stage and not plan.judge  # the given reference has no judge
    assert [s.scale for s in plan.sets] == given.sampling.classifier_scales


def test_the_flow_draws_and_scores_what_the_plan_says(tmp_path, monkeypatch):
    """flows.reproduce executes the plan: one base set per scale keyed by its spec, the
    upsampler and the bilinear baseline where planned, each scored against its reference.
    The stages are stand-ins (no Prefect run, no Ray); checkpoints are only hashed."""
    import json

    import torch

    from flows import reproduce, stages
    from tasks.plan import set_key
    from tasks.sampling import files as sample_io

    cfg = load_config("tiny", [f"storage.root={tmp_path / 'store'}"])
    runs = {}
    for kind in ("diffusion", "classifier", "upsampler"):
        ckpt = tmp_path / kind
        ckpt.mkdir()
        torch.save({kind: torch.zeros(1)}, ckpt / "model.pt")
        meta = {"step": 1, "kind": kind, "config": cfg.model_dump(mode="json")}
        (ckpt / "meta.json").write_text(json.dumps(meta))
        runs[kind] = {"checkpoint": str(ckpt)}
    calls: list[tuple] = []

    def sample(cfg, spec, key, parent):
        out = str(tmp_path / "samples" / key)
        manifest = sample_io.new_manifest(spec.num_samples, spec.image_size, 50, "fp-" + key)
        sample_io.write_manifest(out, {**manifest, "complete": True})
        calls.append(("sample", spec.scale, key == set_key(spec, cfg.storage.root)))
        return {"uri": out, "classifier_scale": spec.classifier_scale}

    def upsample(cfg, spec, base, key, parent):
        calls.append(("upsample", base["classifier_scale"], spec.base_fingerprint))
        return {"uri": key, "classifier_scale": base["classifier_scale"], "upsampled": True}

    def bilinear(cfg, base, cache_key):
        calls.append(("bilinear", base["classifier_scale"]))
        return {"uri": cache_key, "classifier_scale": base["classifier_scale"]}

    def evaluate(cfg, ref, sset, key, parent, tags, judge=None):
        return {"samples": sset["uri"], "reference": ref["uri"], "stage": sset["uri"]}

    for name, fake in [("sample", sample), ("upsample", upsample), ("bilinear", bilinear),
                       ("evaluate", evaluate)]:  # fmt: skip
        monkeypatch.setattr(stages, name, fake)
    plan = plan_reproduce(cfg)
    refs = {"base": ({"uri": "ref16"}, "k16"), "up": ({"uri": "ref32"}, "k32")}
    data = {"manifest_uri": "data/manifest.json"}
    train_data = dict.fromkeys(("diffusion", "classifier", "upsampler"), data)
    rows = reproduce._sample_and_score(cfg, plan, runs, refs, None, train_data, "parent")
    base_of_128 = next(r["base_samples"] for r in rows if r["reference"] == "ref32")
    assert calls == [
        ("sample", 0.0, True),
        ("sample", 8.0, True),
        ("sample", 32.0, True),
        ("sample", 128.0, True),
        ("bilinear", 128.0),
        ("upsample", 128.0, "fp-" + base_of_128.rsplit("/", 1)[-1]),
    ]
    assert [r["reference"] for r in rows] == ["ref16"] * 4 + ["ref32"] * 2
