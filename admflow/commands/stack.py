"""``admflow stack``: real local services on 127.0.0.1 (see infra/stack.py)."""

from __future__ import annotations

import argparse

DEFAULT_STATE = ".admflow/stack"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stack",
        help="start/stop a local S3 + MLflow + Prefect + 2-node Ray stack on 127.0.0.1",
        description=(
            "up: start moto_server (S3), mlflow server (sqlite, S3 artifacts), prefect server "
            "and a process worker, a Ray head and a second Ray node; wait until each is "
            "healthy; write STATE/stack.env to `source` (new ports on every up). down: stop them "
            "by recorded PID; MLflow's and Prefect's databases stay in STATE, the S3 store "
            "(in memory) is lost. "
            "status: each service, its PID and URL."
        ),
    )
    p.add_argument("action", choices=["up", "down", "status"], help="what to do (see above)")
    p.add_argument(
        "--state", default=DEFAULT_STATE, help=f"state directory (default {DEFAULT_STATE})"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from infra import stack

    if args.action == "up":
        s = stack.up(args.state)
        for name, url in s.urls().items():
            print(f"{name:15s} {url}")
        print(f"\npoint admflow at it:  source {s.env_file}")
    elif args.action == "down":
        stopped = stack.down(args.state)
        print("stopped: " + (", ".join(stopped) or "nothing"))
        if "s3" in stopped:
            print(stack.LOST_ON_DOWN)
    else:
        rows = stack.status(args.state)
        if not rows:
            print("no stack recorded in " + args.state)
        for name, info in rows.items():
            state = "up" if info["alive"] else "down"
            print(f"{name:15s} {state:5s} pid={info['pid']}  {info['url']}")
    return 0
