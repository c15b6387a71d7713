"""`evaluation.reference`: when set, reproduce scores against it instead of building a reference
from the training shards; an unreadable one fails before anything starts."""

from __future__ import annotations

import numpy as np
import pytest

from admflow.config import load_config


def test_reference_stage_uses_the_given_batch(tmp_path):
    from flows import stages

    ref = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    cfg = load_config("tiny", [f"evaluation.reference={ref}", f"storage.root={tmp_path}"])
    no_shards = {"uri": str(tmp_path / "never-sharded")}  # would fail if it were read
    assert stages.reference.fn(cfg, no_shards, cache_key="k") == {"uri": str(ref)}


def test_reproduce_rejects_a_missing_reference_before_starting(tmp_path, capsys):
    from admflow.cli import main

    missing = tmp_path / "VIRTUAL_imagenet64_labeled.npz"
    assert main(["reproduce", "--set", f"evaluation.reference={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "evaluation.reference" in err and str(missing) in err


def test_reproduce_rejects_a_non_batch_reference(tmp_path):
    from admflow.config import ConfigError
    from tasks.scoring.inputs import check_reference

    bad = tmp_path / "ref.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(ConfigError, match="neither arr_0"):
        check_reference(load_config("tiny", [f"evaluation.reference={bad}"]).evaluation.reference)


def _flows():
    from flows.paper import paper
    from flows.reproduce import reproduce
    from flows.sample import sample_released

    return reproduce, sample_released, paper


def test_every_flow_reads_its_reference_from_the_config():
    """One way to give the reference: evaluation.reference, for the CLI and deployments alike."""
    import inspect

    for f in _flows():
        params = inspect.signature(f.fn).parameters
        assert "reference" not in params and "overrides" in params, f.name


@pytest.mark.parametrize("flow", ["reproduce", "sample", "paper"])
def test_each_flow_checks_the_reference_before_any_work(tmp_path, flow):
    """A deployment run (no CLI in front) with a wrong or missing reference fails at once, with
    the same one-line ConfigError the CLI prints, before Ray, storage writes or MLflow."""
    from admflow.config import ConfigError

    reproduce, sample_released, paper = _flows()
    store = tmp_path / "store"
    bad = tmp_path / "VIRTUAL_imagenet64_labeled.npz"  # the released name, but no images in it
    np.savez(bad, something=np.zeros(3))
    (tmp_path / "64x64_diffusion.pt").write_bytes(b"never read")
    given = [f"storage.root={store}", f"evaluation.reference={bad}", "upsampler.enabled=false"]
    with pytest.raises(ConfigError, match=r"^evaluation.reference: .*neither arr_0"):
        if flow == "reproduce":
            reproduce.fn(preset="tiny", overrides=given)
        elif flow == "sample":
            sample_released.fn(preset="tiny", checkpoint=str(tmp_path / "c.pt"), overrides=given)
        else:
            paper.fn(row="imagenet64-adm-dropout", checkpoints=str(tmp_path), overrides=given)
    with pytest.raises(ConfigError, match="evaluation.reference: .*give"):
        if flow == "sample":
            sample_released.fn(preset="tiny", checkpoint="c.pt", overrides=given[:1])
        elif flow == "paper":
            paper.fn(row="imagenet64-adm-dropout", checkpoints=str(tmp_path), overrides=[])
        else:
            raise ConfigError("evaluation.reference: reproduce builds one; nothing to give")
    assert not store.exists()


def test_a_two_stage_pipeline_rejects_a_single_reference(tmp_path):
    """The tiny preset scores its base sets at 16px and the upsampled ones at 32px: one given
    reference cannot serve both, and the flow says so before anything starts."""
    from admflow.config import ConfigError

    ref = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(ref, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    cfg = load_config("tiny", [f"evaluation.reference={ref}"])
    with pytest.raises(ConfigError, match=r"16px base sets, 32px upsampled ones\): unset it"):
        cfg.check_pipeline()
    load_config("tiny", [f"evaluation.reference={ref}", "upsampler.enabled=false"]).check_pipeline()
