"""The reproduce flow's plan, decided without Prefect or Ray: which sets are drawn, which
are upsampled and scaled bilinearly, which references and yardsticks are built, which
checkpoints the FID curve scores, and the stage keys known before training."""

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
