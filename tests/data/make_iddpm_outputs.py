"""Regenerate iddpm_outputs.json: improved-diffusion's own network outputs for small
configurations of its README's layouts, with weights drawn by admflow (seeded) and loaded into
its UNet — so tests/test_iddpm_forward.py can check admflow computes the same function (its
legacy-order attention, ResBlocks without scale-shift, the super-resolution input) without
their code.

    PYTHONPATH=/path/to/improved-diffusion python tests/data/make_iddpm_outputs.py > out.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch

sys.path.insert(0, ".")
from tests.test_iddpm_forward import CASES, inputs, our_network  # noqa: E402


def theirs(flags: str, script: str) -> torch.nn.Module:
    from improved_diffusion import script_util as su

    sr = script == "super_res_train"
    defaults = su.sr_model_and_diffusion_defaults() if sr else su.model_and_diffusion_defaults()
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, defaults)
    args = su.args_to_dict(parser.parse_args(shlex.split(flags)), defaults.keys())
    create = su.sr_create_model_and_diffusion if sr else su.create_model_and_diffusion
    return create(**args)[0]


def main() -> None:
    out = {"note": "improved-diffusion's outputs, sliced [:, :, ::8, ::8]; see this script"}
    for name, (script, flags) in CASES.items():
        ours = our_network(name)
        net = theirs(flags, script)
        net.load_state_dict(ours.state_dict(), strict=True)
        x, t, kwargs = inputs(name)
        with torch.no_grad():
            y = net.eval()(x, t, **kwargs)
            mine = ours(x, t, **kwargs)
        print(name, float((y - mine).abs().max()), file=sys.stderr)
        out[name] = [float(f"{v:.8g}") for v in y[:, :, ::8, ::8].double().flatten().tolist()]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
