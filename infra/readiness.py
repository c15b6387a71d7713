"""Readiness of the stack's services: ports held until a service binds them, waits that end
when the service is up, or at once when its process has exited."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"


class Reserved:
    """Ports held bound (not listening) until the service that uses them is spawned: while
    held, the OS gives them to no one else. Ray's processes take ports of their own from the
    OS as they start; without this, one of them took the Prefect server's port before the
    server had bound it, and the server exited ("address already in use")."""

    def __init__(self, names: tuple[str, ...]):
        self.sockets: dict[str, socket.socket] = {}
        for name in names:
            sock = socket.socket()
            sock.bind((HOST, 0))
            self.sockets[name] = sock

    def ports(self) -> dict[str, int]:
        return {name: sock.getsockname()[1] for name, sock in self.sockets.items()}

    def release(self, *names: str) -> None:
        for name in names:
            self.sockets.pop(name).close()

    def close(self) -> None:
        self.release(*list(self.sockets))


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float,
    alive: Callable[[], bool] | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``check`` until it holds; with ``alive``, fail at once when the service's process
    has exited (naming its ``log``) instead of polling a dead port until the timeout."""
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception as e:  # not up yet
            last = e
        if alive is not None and not alive():
            detail = f"; see {log}: {first_error_line(log)}" if log else ""
            raise RuntimeError(f"{what} exited while starting{detail}")
        time.sleep(0.5)
    raise TimeoutError(f"{what} not healthy after {timeout:.0f}s (last error: {last})")


def first_error_line(log: Path) -> str:
    """The first error-looking line of a service's log (or its last line)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(empty log)"])[0 if errors else -1][:300]


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as r:
        return 200 <= r.status < 300


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((HOST, port)) == 0
