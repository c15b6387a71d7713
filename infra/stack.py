"""A real local stack on 127.0.0.1: S3 (moto_server), MLflow server (sqlite + S3 artifacts),
Prefect server + process worker, and a 2-node Ray cluster.

Each service runs in its own session (process group) whose leader's PID is recorded in
``<state>/pids.json``; ``down`` signals exactly those process groups, never processes by
name. ``up`` writes ``<state>/stack.env`` (mode 600: it holds the local S3 test
credentials) for users to ``source``; nothing prints the credentials.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from infra.process_groups import stop_groups
from infra.readiness import HOST, Reserved, http_ok, port_open, wait_until

BUCKET = "admflow"
POOL = "admflow-process"
_LOCAL_S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "admflow-local",
    "AWS_SECRET_ACCESS_KEY": "admflow-local",
}


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class Stack:
    state_dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "pids.json"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "stack.env"

    @property
    def ray_temp_dir(self) -> Path:
        """The stack's own Ray temp dir. In Ray's default one (/tmp/ray) `ray start` leaves
        `ray_current_cluster` naming this stack's head after the stack is gone; Ray's state
        API then resolves to that dead address from any later local Ray on the host, and
        every Ray Train fit there waits ~12 s on its placement-group cleaner at the end.
        Short and under the system temp dir: Ray's socket paths must stay under 108 bytes."""
        digest = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"admflow-ray-{digest}"

    def node_temp_dir(self, name: str) -> Path:
        """Each Ray node's own temp dir under :attr:`ray_temp_dir`. Two nodes sharing one
        unpack a Ray Job's working dir into the same path: the second node's copy replaces
        the one the job's driver runs in, and the driver loses its cwd mid-run; their log
        monitors also both tail the one log dir, so every worker line reaches a driver twice."""
        return self.ray_temp_dir / name.removeprefix("ray-")

    @classmethod
    def load(cls, state_dir: str | Path) -> Stack:
        state = Path(state_dir).resolve()
        stack = cls(state)
        if stack.pid_file.exists():
            data = json.loads(stack.pid_file.read_text())
            stack.ports, stack.pids = data["ports"], data["pids"]
        return stack

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(json.dumps({"ports": self.ports, "pids": self.pids}, indent=2))

    # ------------------------------------------------------------------ environment
    def env(self) -> dict[str, str]:
        """Variables that point admflow (and its children) at this stack."""
        p = self.ports
        return {
            "AWS_ENDPOINT_URL": f"http://{HOST}:{p['s3']}",
            "AWS_DEFAULT_REGION": "us-east-1",
            **_LOCAL_S3_CREDENTIALS,
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{p['mlflow']}",
            "PREFECT_API_URL": f"http://{HOST}:{p['prefect']}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # flow and task run logs go to the server (its UI, `prefect flow-run logs`)
            "PREFECT_LOGGING_TO_API_ENABLED": "true",
            # One result store for the stack's worker, its Ray Jobs and a sourced shell: a
            # flow run from any of them finds the others' cached stages.
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(self.state_dir / "prefect-results"),
            "RAY_ADDRESS": f"{HOST}:{p['ray']}",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "ADMFLOW_STORAGE_ROOT": f"s3://{BUCKET}/store",
        }

    def urls(self) -> dict[str, str]:
        e = self.env()
        return {
            "s3": e["AWS_ENDPOINT_URL"],
            "mlflow": e["MLFLOW_TRACKING_URI"],
            "prefect": e["PREFECT_API_URL"].removesuffix("/api"),
            "prefect-worker": f"pool {POOL}",
            "ray-head": f"{e['RAY_ADDRESS']} (dashboard http://{HOST}:{self.ports['ray-dashboard']})",
            "ray-node": f"joins {e['RAY_ADDRESS']}",
        }

    def write_env_file(self) -> None:
        lines = [f"export {k}={v}" for k, v in self.env().items()]
        self.env_file.write_text("\n".join(lines) + "\n")
        os.chmod(self.env_file, 0o600)

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.state_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            cwd=self.state_dir,
            start_new_session=True,  # its own process group, so `down` reaches its children
        )
        self.pids[name] = proc.pid
        self.save()

    def watch(self, name: str) -> tuple[Callable[[], bool], Path]:
        """What a wait needs to stop at once when ``name`` dies: its liveness and its log."""
        return (lambda: self.alive(name)), self.state_dir / f"{name}.log"

    def alive(self, name: str) -> bool:
        pid = self.pids.get(name)
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie child of this process counts as gone
            done, _ = os.waitpid(pid, os.WNOHANG)
            return done == 0
        except ChildProcessError:
            return True


def _ray_nodes(address: str, env: dict[str, str]) -> int:
    code = (
        f"import ray;ray.init(address={address!r},logging_level='ERROR');"
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


def up(state_dir: str | Path, timeout: float = 300.0) -> Stack:
    """Start every service, wait for each to be healthy, write the env file."""
    stack = Stack.load(state_dir)
    if any(stack.alive(n) for n in stack.pids):
        raise RuntimeError(
            f"a stack is already running from {stack.state_dir}; run `admflow stack down`"
        )
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    names = ("s3", "mlflow", "prefect", "ray", "ray-dashboard", "ray-agent-head", "ray-agent-node")
    held = Reserved(names)
    try:
        stack.ports = held.ports()
        stack.pids = {}
        env = stack.env()
        stack.write_env_file()
        # The servers start together (their start-ups, mostly Python imports, overlap); Ray,
        # which takes further ports from the OS, once they hold theirs.
        held.release("s3", "mlflow", "prefect")
        _spawn_s3(stack, env)
        _spawn_mlflow(stack, env)
        _spawn_prefect(stack, env)
        _wait_s3(stack, env, timeout)
        for name, what, url in (
            ("mlflow", "MLflow server", env["MLFLOW_TRACKING_URI"] + "/health"),
            ("prefect", "Prefect server", env["PREFECT_API_URL"] + "/health"),
        ):
            wait_until(lambda u=url: http_ok(u), what, timeout, *stack.watch(name))
        held.release("ray", "ray-dashboard", "ray-agent-head")
        _spawn_ray_head(stack, env)
        _spawn_prefect_worker(stack, env)
        _start_ray_node(stack, env, timeout, held)
    except BaseException:  # a service that did not come up, or Ctrl-C: leave nothing running
        down(stack.state_dir)
        raise
    finally:
        held.close()
    return stack


def _spawn_s3(stack: Stack, env: dict[str, str]) -> None:
    stack._spawn("s3", [_bin("moto_server"), "-H", HOST, "-p", str(stack.ports["s3"])], env)


def _wait_s3(stack: Stack, env: dict[str, str], timeout: float) -> None:
    ok = env["AWS_ENDPOINT_URL"] + "/moto-api/"
    wait_until(lambda: http_ok(ok), "S3 (moto_server)", timeout, *stack.watch("s3"))
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=env["AWS_ENDPOINT_URL"],
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
    )
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)


def mlflow_server_argv(port: int, backend_store_uri: str, artifacts: str) -> list[str]:
    """``mlflow server`` as admflow runs it: on 127.0.0.1, one worker. Started with
    :data:`MLFLOW_SERVER_ENV` in its environment."""
    return [
        _bin("mlflow"), "server", "--host", HOST, "--port", str(port),
        "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts,
        "--workers", "1",
    ]  # fmt: skip


# admflow logs runs, metrics and artifacts only. MLflow's job runner (huey consumer processes
# for its GenAI jobs, on by default) would add eight processes, ~25 CPU-s at start and ~4 s
# to every stop.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _spawn_mlflow(stack: Stack, env: dict[str, str]) -> None:
    db = stack.state_dir / "mlflow.db"
    argv = mlflow_server_argv(
        stack.ports["mlflow"], f"sqlite:///{db}", f"s3://{BUCKET}/mlflow-artifacts"
    )
    server_env = {**env, **MLFLOW_SERVER_ENV, "MLFLOW_S3_ENDPOINT_URL": env["AWS_ENDPOINT_URL"]}
    stack._spawn("mlflow", argv, server_env)


def _prefect_env(stack: Stack, env: dict[str, str]) -> dict[str, str]:
    return {
        **env,
        "PREFECT_HOME": str(stack.state_dir / "prefect-home"),
        "PREFECT_UI_ENABLED": "true",  # the links Prefect prints (flow runs, deployments)
        "PREFECT_SERVER_API_HOST": HOST,
    }


def _spawn_prefect(stack: Stack, env: dict[str, str]) -> None:
    argv = [
        _bin("prefect"),
        "server",
        "start",
        "--host",
        HOST,
        "--port",
        str(stack.ports["prefect"]),
    ]
    stack._spawn("prefect", argv, _prefect_env(stack, env))


def _spawn_prefect_worker(stack: Stack, env: dict[str, str]) -> None:
    worker = [_bin("prefect"), "worker", "start", "--pool", POOL, "--type", "process"]
    penv = {**_prefect_env(stack, env), "ADMFLOW_REPO": str(Path.cwd())}
    stack._spawn("prefect-worker", worker, penv)


_RAY_COMMON = ["--num-cpus", "1", "--block", "--disable-usage-stats"]


def _ray_common(stack: Stack, name: str) -> list[str]:
    return [*_RAY_COMMON, "--temp-dir", str(stack.node_temp_dir(name))]


def _ray_env(env: dict[str, str]) -> dict[str, str]:
    """A Ray Job's entrypoint (`ray job submit -- admflow ...`) runs with the node's PATH:
    put this installation's scripts first, as the admflow image has them on its PATH."""
    scripts = str(Path(sys.executable).parent)
    return {**env, "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}


def _spawn_ray_head(stack: Stack, env: dict[str, str]) -> None:
    # The dashboard (on loopback) serves Ray's state API: which node ran which task. Each
    # node's agent gets its own port: on the default (52365) the second node on this host, or
    # a Ray already running here, takes it first and the Jobs API answers "No available agent".
    head = [_bin("ray"), "start", "--head", "--node-ip-address", HOST,
            "--port", str(stack.ports["ray"]), "--include-dashboard", "true",
            "--dashboard-host", HOST, "--dashboard-port", str(stack.ports["ray-dashboard"]),
            "--dashboard-agent-listen-port", str(stack.ports["ray-agent-head"]),
            *_ray_common(stack, "ray-head")]  # fmt: skip
    stack._spawn("ray-head", head, _ray_env(env))


def _start_ray_node(stack: Stack, env: dict[str, str], timeout: float, held: Reserved) -> None:
    wait_until(
        lambda: port_open(stack.ports["ray"]),
        "Ray head (GCS port)",
        timeout,
        *stack.watch("ray-head"),
    )
    held.release("ray-agent-node")
    node = [_bin("ray"), "start", "--address", env["RAY_ADDRESS"], "--node-ip-address", HOST,
            "--dashboard-agent-listen-port", str(stack.ports["ray-agent-node"]),
            *_ray_common(stack, "ray-node")]  # fmt: skip
    stack._spawn("ray-node", node, _ray_env(env))
    nodes = env["RAY_ADDRESS"]
    wait_until(
        lambda: _ray_nodes(nodes, env) >= 2, "both Ray nodes", timeout, *stack.watch("ray-node")
    )


LOST_ON_DOWN = (
    "the S3 store (moto_server keeps it in memory) is gone: the next `up` starts an empty "
    "bucket, so earlier runs' artifacts, sample sets, checkpoints and registered models' "
    "files are lost while MLflow and Prefect (their databases stay in the state dir) still "
    "list those runs; rerun `admflow reproduce` to fill it again"
)

# Stop order: the Prefect worker before its server (stack notes), so it goes with the Ray
# cluster (both of its nodes are signalled together) before the servers. The services of one
# phase stop side by side, so a phase takes as long as its slowest service.
_STOP_PHASES = (("prefect-worker", "ray-node", "ray-head"), ("prefect", "mlflow", "s3"))


def down(state_dir: str | Path, timeout: float = 30.0) -> list[str]:
    """Stop every recorded service by its process group; returns the names stopped."""
    stack = Stack.load(state_dir)
    stopped = []
    for phase in _STOP_PHASES:
        groups = []
        for name in phase:
            pid = stack.pids.get(name)
            if not pid:
                continue
            sig = signal.SIGINT if name == "prefect-worker" else signal.SIGTERM
            # A Ray node lingers ~30 s after SIGTERM and keeps nothing we need on disk.
            groups.append((pid, sig, min(timeout, 2.0) if name.startswith("ray") else timeout))
            stopped.append(name)
        stop_groups(groups)
    stack.pids = {}
    stack.save()
    # Ray's sessions (logs, a Ray Job's unpacked files, `ray_current_cluster` naming the
    # dead head) are of no use to the next `up`, which starts a new cluster.
    shutil.rmtree(stack.ray_temp_dir, ignore_errors=True)
    return stopped


def status(state_dir: str | Path) -> dict[str, dict]:
    stack = Stack.load(state_dir)
    if not stack.ports:
        return {}
    urls = stack.urls()
    return {
        name: {"pid": stack.pids.get(name), "alive": stack.alive(name), "url": urls.get(name, "")}
        for name in ("s3", "mlflow", "prefect", "prefect-worker", "ray-head", "ray-node")
    }
