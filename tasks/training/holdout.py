"""Scoring a job's held-out split (the classifier's top-1/top-5) at checkpoints."""

from __future__ import annotations

import torch

from models.precision import autocast
from models.training_losses import Batch
from tasks.training.callbacks import Trainer
from tasks.training.distributed import all_reduce_sum, step_seed
from tasks.training.meter import Meter
from tasks.training.stream import ShardStream, to_model_input


@torch.no_grad()
def evaluate_holdout(trainer: Trainer) -> dict[str, float]:
    """The job's terms on its held-out rows, per quartile of t, summed over workers (on the
    training device, like every collective's input); nothing for a job without a held-out
    split. t and the noise come from a fixed seed, so checkpoints compare."""
    job, session, device = trainer.job, trainer.session, trainer.device
    if not job.holdout_every:
        return {}
    holdout = ShardStream(
        trainer.spec.data_uri, trainer.seed, holdout_every=job.holdout_every, split="holdout"
    )
    rows = holdout.holdout_rows()[session.rank :: session.world_size]
    meter = Meter(job.terms, job.num_timesteps)
    total = torch.zeros(meter.width, dtype=torch.float64, device=device)
    trainer.module.eval()
    gen = torch.Generator().manual_seed(step_seed(trainer.seed, 0, session.rank, 4))
    for lo in range(0, len(rows), 64):
        images, labels = holdout.read_rows(rows[lo : lo + 64])
        x = torch.from_numpy(to_model_input(images)).to(device)
        y = torch.from_numpy(labels).to(device)
        t, _ = trainer.sampler.sample(len(x), device, generator=gen)
        with autocast(trainer.precision, device):
            terms = job.loss(trainer.module, Batch(x, y, t), gen)
        total += meter.vector(terms, t)
    trainer.module.train()
    return meter.summarise(all_reduce_sum(total), prefix="holdout_")
