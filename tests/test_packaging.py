"""What a plain (non-editable) install of admflow holds: presets and declared requirements.

The wheel is built from this checkout and installed, without dependencies, into a fresh
virtual environment that cannot see this checkout; the dependencies come from the test
environment's site-packages appended to the path (their .pth files, among them the
editable install's finder, are not run, so the only admflow there is the wheel's).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(out), str(REPO)],
        check=True,
        timeout=300,
    )
    return next(out.glob("admflow-*.whl"))


def _requirements(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []


def _name(req: str) -> str:
    return req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip()


@pytest.mark.slow
def test_wheel_declares_what_the_s3_path_needs(wheel):
    reqs = [r for r in _requirements(wheel) if "extra ==" not in r]
    names = {_name(r) for r in reqs}
    # MLflow's S3 artifact store imports boto3; the shards and checkpoints need s3fs.
    assert {"boto3", "s3fs", "mlflow", "ray", "prefect"} <= names
    assert "fastapi" not in names  # prefect bounds its own fastapi
    ray = next(r for r in reqs if _name(r) == "ray")
    assert ">=2.51" in ray  # Train V2 (default from 2.51)


@pytest.mark.slow
def test_presets_ship_in_the_wheel(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(py), "-c", "import admflow; print(admflow.__file__)"],
        cwd=elsewhere,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(site)  # the wheel's copy, not this checkout
    shown = subprocess.run(
        [str(env_dir / "bin" / "admflow"), "config", "show", "tiny"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "name: tiny" in shown.stdout
    listed = subprocess.run(
        [str(env_dir / "bin" / "admflow"), "config", "list"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "imagenet64" in listed.stdout and "lsun-bedroom" in listed.stdout
    with zipfile.ZipFile(wheel) as z:  # sub-folders too (the paper's row registry)
        assert "admflow/presets/paper/rows.yaml" in z.namelist()


def test_constraints_pin_what_the_tests_run_with_inside_the_declared_ranges():
    """scripts/install.sh installs with -c constraints.txt: every pin must lie inside the
    ranges pyproject declares (or the install fails), and the pins of the stack's packages
    must be the versions this test run imported (or the lock is not what was tested)."""
    import importlib.metadata

    import tomllib
    from packaging.requirements import Requirement

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = next(iter(req.specifier)).version
    assert "torch" not in pins  # install.sh chooses torch (CPU here, CUDA on GPU machines)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    for line in declared:
        req = Requirement(line)
        if req.name == "torch":
            continue
        pinned = pins.get(req.name.lower())
        assert pinned is not None, f"{req.name} is declared but not pinned in constraints.txt"
        assert req.specifier.contains(pinned, prereleases=True), f"{req.name}=={pinned} vs {req}"
    for name in ("ray", "prefect", "mlflow", "s3fs", "boto3", "moto", "numpy", "pydantic"):
        assert pins[name] == importlib.metadata.version(name), name
    assert "-c constraints.txt" in (REPO / "scripts/install.sh").read_text()
