"""The training loop on an accelerator, checked on CPU: every tensor handed to a collective and
the EMA live on the training device, a step reads the device once, and fp16 loss scaling
skips a non-finite step the way guided-diffusion does (scale halved, parameters and EMA
untouched).

"Host syncs" are counted by patching the Tensor methods that read a value back to the host
(on a GPU each waits for the device) and keeping the calls made from this repository's code.
Calls from models/gaussian_diffusion.py are tallied apart (its schedule lookups must make none).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import tasks.training.loop as loop
from models.ema import EMA
from models.precision import DynamicLossScaler
from tasks.training.callbacks import Callback
from tasks.training.meter import Meter, step_sums
from tasks.training.prefetch import Prefetcher
from tasks.training.sessions import LocalSession
from tests.test_train import local_run, one_torch_thread, shards, small_cfg  # noqa: F401

SHORT = ["training.batch_size=8", "training.log_every=4", "training.checkpoint_every=100"]

# ----------------------------------------------------------------------------- counting


class SyncCounter(Callback):
    """Host reads per step, by call site (``file:line``), from code under ``root``.

    Reads made by torch itself (AdamW's step counters are CPU tensors) are not the loop's."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")

    def __init__(self, root: Path):
        self.root = str(root.resolve())
        self.steps: dict[int, Counter] = {}
        self._current: Counter | None = None
        self._thread = threading.get_ident()

    def on_step_start(self, trainer) -> None:
        self._current = self.steps.setdefault(trainer.step, Counter())

    def install(self, monkeypatch) -> None:
        import sys

        for name in self.METHODS:
            real = getattr(torch.Tensor, name)

            def counted(tensor, *args, _real=real, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if (
                    self._current is not None
                    and threading.get_ident() == self._thread
                    and caller.startswith(self.root)
                    and "/.venv/" not in caller
                ):
                    frame = sys._getframe(1)
                    rel = Path(caller).resolve().relative_to(self.root)
                    self._current[f"{rel}:{frame.f_lineno}"] += 1
                return _real(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def per_step(self, step: int) -> tuple[int, int]:
        """(the loop's reads, models/gaussian_diffusion.py's reads) in ``step``."""
        sites = self.steps[step]
        diffusion = sum(n for s, n in sites.items() if s.startswith("models/gaussian_diffusion"))
        return sum(sites.values()) - diffusion, diffusion


@pytest.mark.parametrize("kind", ["diffusion", "classifier"])
def test_a_step_reads_the_device_once(shards, tmp_path, monkeypatch, kind):  # noqa: F811
    """Outside log steps a step makes one host read (the skip/stop verdict)."""
    counter = SyncCounter(Path(loop.__file__).parents[2])
    counter.install(monkeypatch)
    steps = "training.steps=4" if kind == "diffusion" else "training.classifier_steps=4"
    cfg = small_cfg(tmp_path, *SHORT, steps)
    local_run(cfg, kind, shards, kind, before_run=lambda trainer: trainer.callbacks.append(counter))
    trainer_reads = [counter.per_step(s)[0] for s in (0, 1, 2)]
    print(kind, "reads per step:", {s: dict(c) for s, c in counter.steps.items()})
    assert trainer_reads == [1, 1, 1], counter.steps
    # the diffusion's schedule lookups stay on the device (models.gaussian_diffusion.extract)
    assert [counter.per_step(s)[1] for s in (0, 1, 2)] == [0, 0, 0], counter.steps


# ----------------------------------------------------------------------------- collectives


@pytest.fixture
def process_group():
    """A one-process gloo group: the loop's collectives run for real."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_collectives_get_tensors_on_the_training_device(
    shards,  # noqa: F811
    tmp_path,
    monkeypatch,
    process_group,
):
    seen: list[tuple[str, torch.device]] = []
    for name in ("all_reduce", "all_gather"):
        real = getattr(dist, name)

        def recorded(*args, _real=real, _name=name, **kwargs):
            tensors = args[0] if isinstance(args[0], list) else [args[0]]
            if _name == "all_gather":
                tensors = [*tensors, args[1]]
            seen.extend((_name, x.device) for x in tensors)
            return _real(*args, **kwargs)

        monkeypatch.setattr(dist, name, recorded)
    runs = [
        ("diffusion", ["training.steps=2", "diffusion.schedule_sampler=loss-second-moment"]),
        ("classifier", ["training.classifier_steps=2"]),  # its held-out metrics at the end
    ]
    for kind, over in runs:
        trainer, _ = local_run(small_cfg(tmp_path / kind, *SHORT, *over), kind, shards, kind)
        device = trainer.session.device
        assert {p.device for p in trainer.module.parameters()} == {device}
        assert {name for name, _ in seen} >= {"all_reduce"}
        assert {d for _, d in seen} == {device}, seen
        if kind == "diffusion":
            assert {name for name, _ in seen} == {"all_reduce", "all_gather"}
        seen.clear()


def test_step_sums_stay_on_the_device_of_the_losses():
    """On the meta device a stray CPU tensor would either fail or surface in the result."""
    meta = torch.device("meta")
    meter = Meter(("loss", "mse", "vb"), 1000)
    values = {k: torch.empty(8, device=meta) for k in meter.terms}
    t = torch.empty(8, dtype=torch.long, device=meta)
    sums = step_sums(meter, values, t, torch.empty((), device=meta))
    assert sums.device == meta and sums.shape == (meter.width + 2,)


# ----------------------------------------------------------------------------- the EMA


def test_ema_is_built_on_and_updates_on_the_model_device(shards, tmp_path, monkeypatch):  # noqa: F811
    built: list[bool] = []
    real_ema = loop.EMA

    def recording(module, rates):
        built.append(getattr(module, "prepared", False))
        return real_ema(module, rates)

    class MarkingSession(LocalSession):
        def prepare(self, model):
            model = super().prepare(model)
            model.prepared = True
            return model

    monkeypatch.setattr(loop, "EMA", recording)
    monkeypatch.setattr("tests.test_train.LocalSession", MarkingSession)
    trainer, _ = local_run(
        small_cfg(tmp_path, *SHORT, "training.steps=1"), "diffusion", shards, "e"
    )
    assert built == [True]  # from the prepared network, which is on the training device
    params = dict(trainer.module.named_parameters())
    for shadow in trainer.ema.shadow.values():
        for name, avg in shadow.items():
            assert avg.device == params[name].device and avg.dtype == torch.float32

    # the same holds on any device; on meta a copy to the CPU would fail
    net = nn.Linear(3, 2, device="meta")
    ema = EMA(net, [0.9])
    ema.update(net)
    ema.load_model_state_dict(0.9, nn.Linear(3, 2).state_dict())
    assert {a.device for a in ema.shadow["0.9"].values()} == {torch.device("meta")}


# ----------------------------------------------------------------------------- fp16 skips


class Snapshots(Callback):
    """Parameters, EMA and loss scale at the start of every step."""

    def __init__(self):
        self.at: dict[int, dict] = {}

    def on_step_start(self, trainer) -> None:
        self.at[trainer.step] = {
            "params": {k: v.detach().clone() for k, v in trainer.module.state_dict().items()},
            "ema": {k: v.clone() for k, v in trainer.ema.shadow["0.999"].items()},
            "log2_scale": trainer.scaler.log2_scale,
        }


class PoisonedLoss:
    """The job's loss, NaN while ``when()``."""

    def __init__(self, real, when):
        self.real, self.when = real, when
        self.terms, self.diffusion = real.terms, real.diffusion

    def __call__(self, net, batch, generator):
        out = self.real(net, batch, generator)
        if self.when():
            out["loss"] = out["loss"] * float("nan")
        return out


def loss_scaled(bad_step: int | None, poison: str, snapshots: Snapshots, from_on: bool = False):
    """A before_run hook: fp16's loss scaling on (on CPU, without fp16 autocast), and a
    non-finite loss or gradient at ``bad_step`` (and every later one when ``from_on``)."""

    def hit(trainer) -> bool:
        return bad_step is not None and (
            trainer.step == bad_step or (from_on and trainer.step > bad_step)
        )

    def hook(trainer):
        trainer.scaler = DynamicLossScaler(enabled=True, initial_log2_scale=10.0)
        trainer.callbacks.append(snapshots)
        if poison == "loss":
            trainer.job.loss = PoisonedLoss(trainer.job.loss, lambda: hit(trainer))
        else:
            first = next(trainer.module.parameters())
            first.register_hook(lambda g: g * float("inf") if hit(trainer) else g)

    return hook


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_a_nonfinite_step_is_skipped_and_halves_the_loss_scale(
    shards,  # noqa: F811
    tmp_path,
    poison,
):
    """As guided-diffusion's fp16 training: no optimiser step, no EMA update, lg_loss_scale - 1,
    and training goes on."""
    snaps = Snapshots()
    cfg = small_cfg(tmp_path, *SHORT, "training.steps=4")
    trainer, reports = local_run(
        cfg, "diffusion", shards, poison, before_run=loss_scaled(2, poison, snaps)
    )
    assert trainer.step == 4 and "error" not in reports[-1]
    at = snaps.at
    assert at[3]["log2_scale"] == at[2]["log2_scale"] - 1.0
    assert at[2]["log2_scale"] == pytest.approx(at[1]["log2_scale"] + 1e-3)
    for name in at[2]["ema"]:
        assert torch.equal(at[2]["ema"][name], at[3]["ema"][name]), name
    for name in at[2]["params"]:
        assert torch.equal(at[2]["params"][name], at[3]["params"][name]), name
    changed = [n for n in at[1]["ema"] if not torch.equal(at[1]["ema"][n], at[2]["ema"][n])]
    assert changed  # a step that was taken did move the average
    assert trainer.scaler.skipped_steps == 1 and trainer.skipped_in_a_row == 0
    assert reports[-1]["lg_loss_scale"] == trainer.scaler.log2_scale
    assert all(torch.isfinite(v).all() for v in trainer.module.state_dict().values())


def test_too_many_skipped_steps_in_a_row_stop_the_run(shards, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(loop.Trainer, "max_skipped_in_a_row", 3)
    snaps = Snapshots()
    cfg = small_cfg(tmp_path, *SHORT, "training.steps=10")
    trainer, reports = local_run(
        cfg, "diffusion", shards, "stuck", before_run=loss_scaled(1, "loss", snaps, from_on=True)
    )
    assert trainer.step == 4 and trainer.skipped_in_a_row == 3
    assert "3 steps in a row skipped" in reports[-1]["error"]
    assert "the last at step 3" in reports[-1]["error"]


# ----------------------------------------------------------------------------- prefetch


def test_prefetcher_makes_steps_ahead_in_order_and_restarts_on_a_jump():
    made: list[int] = []

    def make(step: int) -> int:
        made.append(step)
        if step == 7:
            raise ValueError("bad shard")
        return step * 10

    batches = Prefetcher(make, depth=2)
    assert [batches.get(s) for s in (0, 1, 2)] == [0, 10, 20]
    deadline = time.monotonic() + 5
    while max(made) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert max(made) == 5  # made ahead: a full queue of two, and one in hand
    assert batches.get(5) == 50  # a jump (a resumed loop) restarts the producer there
    assert batches.get(6) == 60
    with pytest.raises(ValueError, match="bad shard"):
        batches.get(7)
    batches.close()
