"""Regenerate iddpm_layouts.json: the state-dict layout improved-diffusion's own code builds for
each model its README lists (key -> shape), read from its README flag strings exactly as its
scripts read them (the script's argparser defaults, then the flags).

Run by hand, never by the tests (they only read the JSON), with improved-diffusion's source
(github.com/openai/improved-diffusion, commit in the JSON) on PYTHONPATH:

    PYTHONPATH=/path/to/improved-diffusion python tests/data/make_iddpm_layouts.py > out.json

Networks are built on the meta device: no weights are allocated or downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys

import torch

sys.path.insert(0, ".")
from tests.test_iddpm_layouts import README_MODELS  # noqa: E402

SOURCE = "github.com/openai/improved-diffusion@1bc7bbbdc414d83d4abf2ad8cc1446dc36c4e4d5"
# The run flags of image_train.py / super_res_train.py: accepted, irrelevant to the network.
TRAIN_DEFAULTS = dict(
    data_dir="", schedule_sampler="uniform", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0,
    batch_size=1, microbatch=-1, ema_rate="0.9999", log_interval=10, save_interval=10000,
    resume_checkpoint="", use_fp16=False, fp16_scale_growth=1e-3,
)  # fmt: skip


def build(flags: str, script: str) -> torch.nn.Module:
    from improved_diffusion import script_util as su

    sr = script == "super_res_train"
    defaults = dict(TRAIN_DEFAULTS)
    defaults.update(
        su.sr_model_and_diffusion_defaults() if sr else su.model_and_diffusion_defaults()
    )
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, defaults)
    args = parser.parse_args(shlex.split(flags))
    create = su.sr_create_model_and_diffusion if sr else su.create_model_and_diffusion
    keys = (
        su.sr_model_and_diffusion_defaults() if sr else su.model_and_diffusion_defaults()
    ).keys()
    with torch.device("meta"):
        model, _ = create(**su.args_to_dict(args, keys))
    return model


def main() -> None:
    layouts: dict[str, dict[str, list[int]]] = {}
    models = {}
    for name, (script, flags, _file) in README_MODELS.items():
        sd = build(flags, script).state_dict()
        layout = {k: list(v.shape) for k, v in sd.items()}
        digest = hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]
        layouts[digest] = layout
        params = sum(v.numel() for v in sd.values())
        models[name] = {"layout": digest, "keys": len(layout), "params": params}
    note = (
        "state-dict key -> shape of improved-diffusion's networks for its README's models, "
        "built on the meta device by tests/data/make_iddpm_layouts.py from its source"
    )
    out = {"note": note, "source": SOURCE, "models": models, "layouts": layouts}
    json.dump(out, sys.stdout, separators=(",", ":"))


if __name__ == "__main__":
    main()
