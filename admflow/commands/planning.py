"""``--plan``: check every input of a command and print what it would run, without starting
Ray or Prefect.

The same checks open every real run (:func:`preflight`), so a run never fails late on
something ``--plan`` sees: the storage root (form, bucket, writable), each checkpoint (loads
strictly onto the meta device), the reference batch (readable, the samples' size), the
Inception weights, and the resource plan (every stage placeable on the cluster). ``--plan``
adds what the run would compute: per stage its workers or actors with their CPUs and GPUs,
images, network evaluations, and the time the cost table (``admflow/costs.yaml``) gives.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from admflow.config import AdmConfig

PLAN_HELP = (
    "check every input (storage, checkpoints, reference, Inception weights, placement) and "
    "print the plan: per stage workers/actors with CPUs and GPUs, images, network "
    "evaluations and the estimated time; starts neither Ray nor Prefect"
)


def add_plan_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", action="store_true", help=PLAN_HELP)


@dataclass
class RunInputs:
    """What a command reads and which stages it runs (resource-plan stage names)."""

    command: str
    stages: tuple[str, ...]
    checkpoints: dict[str, str] = field(default_factory=dict)  # kind -> uri
    reference: str | None = None
    reference_size: int | None = None  # the px of the sets scored against it
    reference_label: str = "evaluation.reference"  # how the user gave it
    scores: bool = False
    outputs: tuple[str | None, ...] = ()


def preflight(cfg: AdmConfig, inputs: RunInputs) -> list[str]:
    """Every check, in the order a run would meet its inputs; one line per finding. Raises
    the first problem as a one-line ConfigError / StorageError."""
    from admflow.preflight import check_outputs
    from admflow.uris import mask_uri
    from tasks.checks import check_checkpoint, check_inception, check_reference_fits
    from tasks.resources import cluster_for, resource_plan

    check_outputs(*inputs.outputs, cfg.storage.root, create_bucket=cfg.storage.create_bucket)
    lines = [f"storage root {mask_uri(cfg.storage.root)}: writable"]
    lines += [check_checkpoint(uri, cfg, kind) for kind, uri in inputs.checkpoints.items()]
    if inputs.reference:
        size = inputs.reference_size
        lines.append(check_reference_fits(inputs.reference, size, what=inputs.reference_label))
    if inputs.scores:
        lines.append(check_inception(cfg))
    plan = resource_plan(cfg, cluster_for(cfg))
    plan.check(inputs.stages)
    if cfg.compute.use_gpu:  # actors sharing a GPU must fit it together
        from tasks.memory import check_shared_gpus, estimate_memory

        placed = [p for p in plan.stages if p.stage in inputs.stages]
        check_shared_gpus(estimate_memory(cfg), placed)
    return lines


def show_plan(cfg: AdmConfig, inputs: RunInputs, work: list) -> int:
    """``--plan``: the checks' findings, the placement of the command's stages and their
    work, printed; rc 0 (a failed check raises, and the CLI prints it as one line, rc 2)."""
    from admflow import costs
    from tasks.resources import cluster_for, resource_plan

    found = preflight(cfg, inputs)
    plan = resource_plan(cfg, cluster_for(cfg))
    print(f"admflow {inputs.command} --plan")
    print("inputs:")
    for line in found:
        print(f"  {line}")
    print("placement:")
    print(f"  {plan.lines()[0]}")
    for p in plan.stages:
        if p.stage in inputs.stages:
            print(f"  {p.line()}")
    if cfg.compute.use_gpu:
        _print_memory(cfg, [p for p in plan.stages if p.stage in inputs.stages])
    print("work (time from admflow/costs.yaml):")
    table = costs.load_costs()
    device = "gpu" if cfg.compute.use_gpu else "cpu"
    for w in work:
        stage = w.stage.split(" ")[0]
        placed = next((p for p in plan.stages if p.stage == stage), None)
        gpus = placed.workers * placed.gpus if placed else 0.0  # actors may share a GPU
        print(f"  {w.line(device, max(gpus, 1.0), table)}")
    return 0


def _print_memory(cfg: AdmConfig, placed: list) -> None:
    """The memory model's per-GPU peak of each GPU stage the command runs (docs/memory.md),
    times the actors that share one GPU."""
    from tasks.memory import estimate_memory

    est = estimate_memory(cfg)
    shares = {p.stage: int(1 / p.gpus + 1e-9) for p in placed if 0 < p.gpus < 1}
    rows = [s for s in est.stages if s.stage in {p.stage for p in placed}]
    if not rows:
        return
    print("memory per GPU (the memory model, docs/memory.md):")
    table = est.lines()
    print(f"  {table[0]}")
    for s, line in zip(est.stages, table[1:], strict=True):
        if s in rows:
            print(f"  {line}")
    for s in rows:
        if s.stage in shares:
            k = shares[s.stage]
            print(f"  {s.stage}: {k} actors share each GPU, {k} x {s.peak / 2**30:.1f} GiB = "
                  f"{k * s.peak / 2**30:.1f} GiB of {s.budget / 2**30:.1f}")  # fmt: skip
        if not s.fits:
            print(f"  warning: {s.stage} is estimated over the {s.budget / 2**30:.1f} GiB budget")
