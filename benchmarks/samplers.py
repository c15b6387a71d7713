"""Sampler leaderboard: FID (and a judge's class accuracy) against network evaluations.

For one trained model, every sampler (ddpm, ddim, dpm++2m, dpm++2m-sde, unipc) runs at each
budget of network evaluations (NFE, default 5, 10, 15, 25, 50), unguided and guided (the noisy
classifier at the preset's scale, or classifier-free guidance for a model trained with label
dropout), all from the same x_T and labels. Classifier-free guidance evaluates the network
twice a step, so a budget buys it half as many steps (``budget // 2``) and its sets are keyed
by the evaluations they spend. Each set is scored with the project's evaluator pieces
(models.inception features, models.metrics FID) against the reference features of the base
model's training data at its own resolution. One progress line per set goes to stderr.

Prints one JSON object:
  fid_by_sampler_nfe       {sampler: {network evaluations: FID}}; guided sets are named e.g.
                           "unipc+classifier2"
  best_at_10_vs_ddim_25    min over the solvers of FID@10 / DDIM FID@25 (< 1: better), unguided
  best_at_5_vs_ddim_15     the same at 5 vs 15; "…_guided" variants for the guided sets
  accuracy_by_sampler_nfe  the judge's top-1 on the target labels (see --judge)
  seconds_per_image        sampling time per image and set (this machine, this load)
and writes OUT/samplers.json and OUT/fid_vs_nfe.png; both go to MLflow when a tracking URI is
configured (tracking.tracking_uri or $MLFLOW_TRACKING_URI).

Defaults find the demo's latest runs under the store (storage.root, ./admflow-store):

    python benchmarks/samplers.py --num-samples 100
    python benchmarks/samplers.py --checkpoint STORE/runs/diffusion-…/checkpoints/step-000200 \\
        --classifier … --reference STORE/data/… --nfes 5,10 --samplers ddim,unipc --num-samples 16

The default reference is the newest shard set at the base model's resolution (a two-stage
demo shards twice; the upsampler's set is not the base model's reference). The judge is by
default the demo's (tasks.scoring.judge: small CNNs trained on the labelled reference images,
with its held-out accuracy and the FID floor of real images at this sample count in the
JSON); ``--judge module:function`` plugs in any classifier of images instead:
function(uint8 NHWC array) -> predicted class ids. FID from a few hundred images is biased
upwards (compare sets of the same size only); the number of images is in the JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from admflow import storage  # noqa: E402
from admflow.config import AdmConfig, load_config  # noqa: E402
from models.grids import STEP_SCHEDULES  # noqa: E402
from models.samplers import make_sample_loop  # noqa: E402
from models.solvers import SOLVERS  # noqa: E402

SAMPLERS = ("ddpm", "ddim", *SOLVERS)


# ---------------------------------------------------------------------------- inputs


def latest_run_checkpoint(root: str, kind: str) -> str | None:
    """The newest checkpoint of the newest ``kind`` run under ``root``/runs (or None)."""
    from tasks.training.checkpoint import checkpoints_uri, latest_checkpoint

    runs_dir = storage.join(root, "runs")
    if not storage.exists(runs_dir):
        return None
    fs, path = storage.filesystem(runs_dir)
    runs = [p for p in fs.ls(path, detail=True) if p["name"].rsplit("/", 1)[-1].startswith(kind)]
    for run in sorted(runs, key=lambda p: p.get("mtime") or p.get("created") or 0, reverse=True):
        found = latest_checkpoint(checkpoints_uri(_uri(runs_dir, run["name"])))
        if found:
            return found
    return None


def _uri(base: str, name: str) -> str:
    return storage.join(base, name.rsplit("/", 1)[-1])


def default_reference(root: str, image_size: int) -> str | None:
    """The newest shard set under ``root``/data at ``image_size`` (the base model's training
    images: a two-stage demo also shards at the upsampler's size, which is not the base
    model's reference)."""
    data = storage.join(root, "data")
    if not storage.exists(data):
        return None
    fs, path = storage.filesystem(data)
    sets = sorted(fs.ls(path, detail=True), key=lambda p: p.get("mtime") or 0, reverse=True)
    for entry in sets:
        manifest = storage.join(_uri(data, entry["name"]), "manifest.json")
        if storage.exists(manifest) and storage.read_json(manifest).get("image_size") == image_size:
            return _uri(data, entry["name"])
    return None


def load_network(uri: str, cfg: AdmConfig, kind: str, device: torch.device) -> tuple[Any, Any]:
    """(network, its config section) from one of our checkpoints or a released .pt."""
    from models.build import build_classifier, build_unet
    from models.checkpoints import load_state_dict_strict, read_state_dict
    from tasks.sampling.weights import resolve_checkpoint

    ckpt = resolve_checkpoint(uri, cfg.sampling.use_ema, cfg.training.ema_rate)
    source = ckpt.config or cfg
    section = source.model if kind == "model" else source.classifier
    build = build_unet if kind == "model" else build_classifier
    net = build(section, device="meta")
    with storage.open_read(ckpt.weights) as f:
        load_state_dict_strict(net, read_state_dict(f), source=f"{kind} checkpoint {uri}")
    return net.to(device).eval().requires_grad_(False), source


def load_judge(spec: str | None) -> Callable[[np.ndarray], np.ndarray] | None:
    if not spec or spec in ("auto", "none"):
        return None
    module, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--judge: expected module:function, got {spec!r}")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------------------- sampling


def sample_loop(cfg: AdmConfig, sampler: str, steps: int, schedule: str) -> Callable[..., Any]:
    """The loop of ``sampler`` taking ``steps`` steps (one network evaluation each, two with
    classifier-free guidance)."""
    from models.diffusion_factory import create_diffusion

    if sampler in SOLVERS:
        return make_sample_loop(
            create_diffusion(cfg.diffusion), sampler, steps=steps, schedule=schedule
        )
    try:  # ADM's DDIM stride where it exists, else evenly spaced steps
        diffusion = create_diffusion(cfg.diffusion, f"ddim{steps}" if sampler == "ddim" else "")
        if sampler == "ddpm" or diffusion.num_timesteps != steps:
            raise ValueError
    except ValueError:
        diffusion = create_diffusion(cfg.diffusion, str(steps))
    return make_sample_loop(diffusion, sampler)


def draw_set(loop, model, labels, noise, cond_fn, batch: int) -> np.ndarray:
    out = []
    for lo in range(0, len(labels), batch):
        y = labels[lo : lo + batch]
        x = loop(
            model,
            tuple(noise[lo : lo + batch].shape),
            noise=noise[lo : lo + batch],
            cond_fn=cond_fn,
            model_kwargs={"y": y},
            generator=torch.Generator().manual_seed(lo),  # DDPM's step noise
        )
        out.append(((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------- scoring


class Scorer:
    def __init__(self, cfg: AdmConfig, reference: str, device: torch.device):
        from models.inception import load_inception
        from tasks.scoring.features import features_for

        feats, self.reference_features = features_for(cfg, reference, workers=0)
        from tasks.scoring.evaluate import _stats

        self.ref_stats = _stats(feats, "pool", "mu", "sigma")
        self.inception = load_inception(cfg.evaluation.inception_weights, device)
        self.method = cfg.evaluation.fid_method
        self.batch = cfg.evaluation.batch_size

    def score(self, images: np.ndarray) -> tuple[float, np.ndarray]:
        """(FID against the reference, the images' Inception pool features)."""
        from models.metrics import frechet_distance_to_features

        pool = np.concatenate(
            [
                self.inception.features(images[i : i + self.batch])["pool"]
                for i in range(0, len(images), self.batch)
            ]
        )
        fid = frechet_distance_to_features(*self.ref_stats, pool.astype(np.float64), self.method)
        return fid, pool


def demo_judge(
    cfg: AdmConfig, reference: str, scorer: Scorer, num_samples: int
) -> tuple[Callable[[np.ndarray, np.ndarray], float] | None, dict[str, Any]]:
    """The demo's judge (a small CNN trained on the labelled reference images), if this
    checkout has one and the reference is labelled: (accuracy(images, labels), its summary)."""
    try:
        from models.judge import judge_accuracy
        from tasks.scoring.judge import build_judge, read_judge
    except ImportError:
        return None, {"judge": "none in this checkout"}
    try:
        info = build_judge(cfg, reference, scorer.reference_features, num_samples)
    except ValueError as e:  # an unlabelled reference
        return None, {"judge": str(e)}
    model, _ = read_judge(info["uri"])

    def accuracy(images: np.ndarray, labels: np.ndarray) -> float:
        return judge_accuracy(model, images, labels)

    return accuracy, {k: v for k, v in info.items() if k != "uri"}


def ratio(table: dict, keys: list[str], nfe: int, base_key: str, base_nfe: int) -> float | None:
    best = [table[k][nfe] for k in keys if nfe in table.get(k, {})]
    base = table.get(base_key, {}).get(base_nfe)
    return min(best) / base if best and base else None


def summary(fids: dict, guided_suffix: str | None, guided_per_step: int = 1) -> dict:
    """The solvers' best FID at a budget over DDIM's at a larger one; a guided set that
    evaluates the network ``guided_per_step`` times a step is read at the evaluations its
    budget buys (``per_step * (budget // per_step)``)."""
    out = {}
    for suffix, name, per in [("", "", 1), (guided_suffix, "_guided", guided_per_step)]:
        if suffix is None:
            continue
        solvers = [f"{s}{suffix}" for s in SOLVERS]
        for few, many in ((10, 25), (5, 15)):
            a, b = per * (few // per), per * (many // per)
            out[f"best_at_{few}_vs_ddim_{many}{name}"] = ratio(fids, solvers, a, f"ddim{suffix}", b)
    return out


def plot(fids: dict, path: str, title: str, per_step: int = 1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ticks: set[int] = set()
    for name, by_nfe in fids.items():
        points = sorted((int(n), fid) for n, fid in by_nfe.items())  # JSON keys are strings
        ax.plot([n for n, _ in points], [f for _, f in points], marker="o", label=name)
        ticks.update(n for n, _ in points)
    ax.set(
        xlabel="network evaluations" + (" (guided: two per step)" if per_step == 2 else ""),
        ylabel="FID",
        title=title,
        xscale="log",
    )
    ax.set_xticks(sorted(ticks), [str(n) for n in sorted(ticks)])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_mlflow(cfg: AdmConfig, result: dict, files: list[str]) -> str | None:
    if not (cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        return None
    import mlflow

    from admflow.tracking import stage_run

    with stage_run(cfg, "sampler-leaderboard", sections=("sampling",)) as run:
        for name, by_nfe in result["fid_by_sampler_nfe"].items():
            for nfe, fid in by_nfe.items():
                key = name.replace("++", "pp").replace("+", ".")  # fid.dpmpp2m.classifier2
                mlflow.log_metric(f"fid.{key}", fid, step=int(nfe))
        for k, v in result.items():
            if k.startswith("best_at") and v is not None:
                mlflow.log_metric(k, v)
        for f in files:
            mlflow.log_artifact(f)
        return run.info.run_id


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="preset (default tiny, the demo's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--checkpoint", help="diffusion checkpoint (default: newest demo run)")
    p.add_argument("--classifier", help="noisy classifier checkpoint (default: newest demo run)")
    p.add_argument("--reference", help="reference images/features (default: the demo's shards)")
    p.add_argument("--guidance", choices=["auto", "classifier", "free", "none"], default="auto")
    p.add_argument("--scale", type=float, help="guidance scale (default: the preset's)")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--nfes", default="5,10,15,25,50")
    p.add_argument("--schedule", choices=STEP_SCHEDULES, default="time")
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--judge",
        default="auto",
        metavar="MODULE:FUNCTION",
        help="clean-image classifier: function(uint8 NHWC) -> class ids; auto: the demo's "
        "judge (tasks.scoring.judge) when there is one; none",
    )
    p.add_argument("--random-init", action="store_true", help="random weights, timing only")
    p.add_argument("--out", default="benchmark-samplers", help="folder for JSON and plot")
    return p.parse_args(argv)


def setup(args: argparse.Namespace, cfg: AdmConfig, device: torch.device) -> dict[str, Any]:
    """Model, guided variant, labels and scorer: everything fixed across the sets."""
    from models.guidance import classifier_free, cond_fn_from_classifier, drop_class_labels

    root = cfg.storage.root
    if args.random_init:
        from benchmarks.sampler import give_zero_modules_weights
        from models.build import build_unet

        net, source = build_unet(cfg.model), cfg
        give_zero_modules_weights(net)
        net = net.to(device).eval().requires_grad_(False)
    else:
        uri = args.checkpoint or latest_run_checkpoint(root, "diffusion")
        if not uri:
            raise SystemExit(f"no --checkpoint and no diffusion run under {root}/runs")
        net, source = load_network(uri, cfg, "model", device)
    classes = source.model.num_classes or source.classifier.num_classes
    gen = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, classes, (args.num_samples,), generator=gen).to(device)
    size, channels = source.model.image_size, source.model.in_channels
    noise = torch.randn((args.num_samples, channels, size, size), generator=gen).to(device)
    model = net if source.model.num_classes else drop_class_labels(net)
    guidance = args.guidance
    clf_uri = args.classifier or (
        None if args.random_init else latest_run_checkpoint(root, "classifier")
    )
    if guidance == "auto":
        guidance = "free" if source.model.null_class else ("classifier" if clf_uri else "none")
    guided: dict[str, Any] = {"name": None}
    if guidance == "classifier":
        if not clf_uri:
            raise SystemExit("--guidance classifier: no --classifier and none under the store")
        clf, _ = load_network(clf_uri, cfg, "classifier", device)
        from tasks.sampling.spec import default_scale

        scale = args.scale or default_scale(cfg.sampling.classifier_scales, True) or 1.0
        guided = {"name": f"+classifier{scale:g}", "cond_fn": cond_fn_from_classifier(clf, scale)}
    elif guidance == "free":
        w = args.scale or cfg.sampling.cfg_scale or 1.0
        guided = {
            "name": f"+free{w:g}",
            "model": classifier_free(net, w, source.model.num_classes),
            "evals_per_step": 2,  # the conditional and the unconditional pass
        }
    return {"model": model, "labels": labels, "noise": noise, "guided": guided, "size": size}


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def plan_sets(
    variants: list[tuple[str, Any, Any, int]], samplers: list[str], budgets: list[int]
) -> list[dict[str, Any]]:
    """One entry per set: a budget of network evaluations buys ``budget // per_step`` steps
    (classifier-free guidance evaluates the network twice a step); the set is keyed by the
    evaluations it spends. The sets the headline ratio needs (DDIM at 25, the solvers at 10)
    go first, so a run cut short has them."""
    sets = []
    for suffix, model, cond_fn, per_step in variants:
        for sampler in samplers:
            for budget in budgets:
                steps = budget // per_step
                if steps < (3 if sampler in SOLVERS else 1):
                    continue
                sets.append({"name": f"{sampler}{suffix}", "sampler": sampler, "steps": steps,
                             "nfe": steps * per_step, "model": model, "cond_fn": cond_fn,
                             "budget": budget})  # fmt: skip

    def headline(job: dict[str, Any]) -> bool:
        return (job["sampler"], job["budget"]) in {("ddim", 25), *((s, 10) for s in SOLVERS)}

    return sorted(sets, key=lambda job: not headline(job))  # stable: the rest keep their order


def run_sets(args, cfg, run, sets, scorer, probe, judge) -> tuple[dict, dict, dict]:
    """Draw and score every planned set, one progress line each on stderr; the figures so
    far go to OUT/samplers.partial.json after each set."""
    fids: dict[str, dict[int, float]] = {}
    accs: dict[str, dict[int, float]] = {}
    secs: dict[str, dict[int, float]] = {}
    labels = run["labels"].cpu().numpy()
    begin = time.perf_counter()
    for i, job in enumerate(sets, 1):
        name, nfe = job["name"], job["nfe"]
        loop = sample_loop(cfg, job["sampler"], job["steps"], args.schedule)
        t0 = time.perf_counter()
        with torch.no_grad():
            images = draw_set(
                loop, job["model"], run["labels"], run["noise"], job["cond_fn"], args.batch_size
            )
        secs.setdefault(name, {})[nfe] = (time.perf_counter() - t0) / len(images)
        if scorer is not None:
            fids.setdefault(name, {})[nfe], _pool = scorer.score(images)
            if probe is not None:
                accs.setdefault(name, {})[nfe] = probe(images, labels)
        if judge is not None:
            accs.setdefault(name, {})[nfe] = float(np.mean(judge(images) == labels))
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "samplers.partial.json"), "w") as f:
            json.dump({"sets_done": i, "sets": len(sets), "fid_by_sampler_nfe": fids,
                       "accuracy_by_sampler_nfe": accs, "seconds_per_image": secs}, f, indent=2)  # fmt: skip
        spent = time.perf_counter() - begin
        left = spent / i * (len(sets) - i)  # sets differ in cost: a rough guide
        progress(
            f"{i}/{len(sets)} {name} at {nfe} evaluations ({job['steps']} steps): "
            f"FID {_num(fids.get(name, {}).get(nfe))}, class acc "
            f"{_num(accs.get(name, {}).get(nfe))}; {spent / 60:.1f} min so far, "
            f"~{left / 60:.0f} min left"
        )
    return fids, accs, secs


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    unknown = set(samplers) - set(SAMPLERS)
    if unknown:
        raise SystemExit(f"--samplers: unknown {sorted(unknown)}; choose from {SAMPLERS}")
    budgets = sorted(int(n) for n in args.nfes.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    progress("loading the networks")
    run = setup(args, cfg, device)
    scorer = None
    if not args.random_init:
        reference = args.reference or default_reference(cfg.storage.root, run["size"])
        if not reference:
            raise SystemExit(
                f"no --reference and no {run['size']}px shard set under {cfg.storage.root}/data"
            )
        progress(f"reference features of {reference} (Inception; cached after the first run)")
        scorer = Scorer(cfg, reference, device)
    judge = load_judge(args.judge)
    probe, judge_info = None, {}
    if args.judge == "auto" and scorer is not None:
        progress("the judge (trained once per reference, then cached)")
        probe, judge_info = demo_judge(cfg, reference, scorer, args.num_samples)
    variants = [("", run["model"], None, 1)]
    g = run["guided"]
    if g["name"]:
        variants.append(
            (g["name"], g.get("model", run["model"]), g.get("cond_fn"), g.get("evals_per_step", 1))
        )
    with torch.no_grad():  # warm-up (allocator, kernels) so the first set's time is fair
        t = torch.zeros(1, dtype=torch.long, device=device)
        run["model"](run["noise"][:1], t, y=run["labels"][:1])
    sets = plan_sets(variants, samplers, budgets)
    progress(f"{len(sets)} sets of {args.num_samples} samples")
    fids, accs, secs = run_sets(args, cfg, run, sets, scorer, probe, judge)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "num_samples": args.num_samples,
        "schedule": args.schedule,
        "guided_as": g["name"],
        "guided_evaluations_per_step": g.get("evals_per_step", 1) if g["name"] else None,
        "reference": reference if scorer is not None else None,
        "fid_by_sampler_nfe": fids,
        **summary(fids, g["name"], g.get("evals_per_step", 1)),
        "accuracy_by_sampler_nfe": accs or None,
        **judge_info,
        "seconds_per_image": secs,
    }
    os.makedirs(args.out, exist_ok=True)
    files = [os.path.join(args.out, "samplers.json")]
    with open(files[0], "w") as f:
        json.dump(result, f, indent=2)
    if fids:
        files.append(os.path.join(args.out, "fid_vs_nfe.png"))
        title = (f"{cfg.name}: FID vs network evaluations ({args.num_samples} samples, "
                 f"{args.schedule} grid)")  # fmt: skip
        plot(fids, files[1], title, result["guided_evaluations_per_step"] or 1)
    result["mlflow_run_id"] = log_mlflow(cfg, result, files)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
