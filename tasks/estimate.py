"""What a run will compute, before it runs: images and network evaluations per stage, and the
device time they take according to the cost table (``admflow/costs.yaml``).

Network evaluations per image (NFE) come from the sampler's own step grid
(:func:`models.samplers.sampler_grid`), so the estimate counts exactly the steps the actors
will take. Device time is ``s/img/NFE × images × NFE`` with the figure measured for the same
network on the same device kind; a network or device the benchmarks have not measured has no
estimate (``None``), never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from admflow import costs
from admflow.config import AdmConfig, load_config

CostTable = dict[str, dict[str, costs.Cost | None]]  # costs.load_costs()


@dataclass(frozen=True)
class StageWork:
    """One stage's work: ``images`` each through ``evaluations`` network evaluations of the
    cost-table network ``network`` (None: not in the table)."""

    stage: str
    images: int
    evaluations: int
    network: str | None = None
    guided: bool = False

    def device_hours(self, device: str, table: CostTable) -> float | None:
        """Hours on one device of kind ``device`` (cpu | gpu), per the cost table."""
        cost = table.get(self.network or "", {}).get(device)
        return None if cost is None else cost.hours(self.images, self.evaluations)

    def line(self, device: str, devices: float, table: CostTable) -> str:
        """One row of the plan: the work, and its wall time spread over ``devices`` GPUs. A CPU
        figure is a whole machine's (all the threads it was measured with), so on CPU the wall
        time is the machine's, whatever the number of actors sharing its cores."""
        what = f"{self.images:,} images x {self.evaluations} NFE"
        if self.guided:
            what += " (guided: + a classifier gradient each)"
        hours = self.device_hours(device, table)
        if hours is None:
            why = (
                f"{self.network} has no {device} figure in admflow/costs.yaml yet"
                if self.network
                else "admflow/costs.yaml holds the released sampling networks only"
            )
            return f"{self.stage:22s} {what}; time: n/a ({why})"
        if device == "cpu":
            return f"{self.stage:22s} {what}; ~{_duration(hours * 3600)} on a machine like the measured one"
        wall = hours / max(devices, 1e-9)
        return (
            f"{self.stage:22s} {what}; {hours:,.2f} {device}-hours, "
            f"~{_duration(wall * 3600)} wall over {devices:g} GPUs"
        )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def evaluations_per_image(
    diffusion: Any, sampler: str, respacing: str, solver_steps: int | None, schedule: str
) -> int:
    """Network evaluations one image takes: the length of the grid the sampler walks."""
    from admflow.config import DiffusionConfig
    from models.diffusion_factory import create_diffusion
    from models.samplers import sampler_grid

    d = create_diffusion(DiffusionConfig.model_validate(diffusion), timestep_respacing=respacing)
    return len(sampler_grid(sampler, d, solver_steps, schedule))


@cache
def _table_networks() -> tuple[tuple[str, str, dict, bool], ...]:
    """(name, section, network kwargs, guided) of every network in the cost table."""
    out = []
    for name, entry in costs.read_table()["networks"].items():
        cfg = load_config(entry["preset"])
        if cfg.upsampler.enabled and name.startswith("upsampler"):
            out.append((name, "upsampler", cfg.upsampler.unet.unet_kwargs(), False))
        else:
            out.append((name, "model", cfg.model.unet_kwargs(), bool(entry.get("classifier"))))
    return tuple(out)


def cost_network(cfg: AdmConfig, section: str, guided: bool) -> str | None:
    """The cost-table network with the same layout (and guidance) as ``cfg``'s ``section``."""
    net = cfg.upsampler.unet if section == "upsampler" else cfg.model
    kwargs = net.unet_kwargs()
    for name, sec, table_kwargs, table_guided in _table_networks():
        if sec == section and table_kwargs == kwargs and table_guided == guided:
            return name
    return None


def sampling_work(
    cfg: AdmConfig, stage: str, images: int, guided: bool, section: str = "model"
) -> StageWork:
    """A sample set of ``images`` drawn with ``cfg.sampling``'s sampler (the upsampler's
    sampler and respacing for ``section='upsampler'``)."""
    s = cfg.sampling
    sampler, respacing = s.sampler, s.timestep_respacing
    if section == "upsampler":
        sampler, respacing = s.upsample_sampler or sampler, s.upsample_respacing or respacing
    diffusion = cfg.upsampler.diffusion if section == "upsampler" else cfg.diffusion
    nfe = evaluations_per_image(
        diffusion.model_dump(), sampler, respacing, s.solver_steps, s.step_schedule
    )
    return StageWork(stage, images, nfe, cost_network(cfg, section, guided), guided)


def training_work(cfg: AdmConfig, kind: str) -> StageWork:
    """A training: every step passes one global batch through the network once (forward and
    backward; the cost table holds sampling figures, so no time is estimated)."""
    t = cfg.training
    steps = {"classifier": t.classifier_steps, "upsampler": t.upsampler_steps}.get(kind, t.steps)
    return StageWork(f"train-{kind}", steps * t.batch_size, 1)


def scoring_work(stage: str, images: int) -> StageWork:
    """Images through Inception once each."""
    return StageWork(stage, images, 1)


def reproduce_work(cfg: AdmConfig) -> list[StageWork]:
    """Every stage of the reproduce flow's plan (:func:`tasks.plan.plan_reproduce`): the
    trainings, then each guidance scale's base set, its upsampled set, and the scoring."""
    from tasks.plan import plan_reproduce

    plan = plan_reproduce(cfg)
    work = [training_work(cfg, kind) for kind in plan.trainings]
    n = cfg.sampling.num_samples
    work.append(scoring_work("reference", cfg.evaluation.reference_images))
    scored = 0
    for s in plan.sets:
        work.append(sampling_work(cfg, f"sample (scale {s.scale:g})", n, s.guided))
        scored += n * (1 + int(s.upsample) + int(s.bilinear))
        if s.upsample:
            up = sampling_work(cfg, f"upsample (scale {s.scale:g})", n, False, "upsampler")
            work.append(up)
    work.append(scoring_work("score", scored))
    return work
