"""Helpers for tests that run Graft for real: servers in threads or processes, small datasets."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx

from tests.support.data import hymenoptera_files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, log: Path | None = None, timeout: float = 90,
              status: int = 200) -> None:
    """Until GET url answers `status`; fails early, with the log, if the process died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == status:
                return
        except httpx.TransportError:
            pass
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up" + (f":\n{log.read_text()[-4000:]}" if log else ""))
        time.sleep(0.3)


def stop(proc: subprocess.Popen, grace_s: float = 20, signal_first: bool = True) -> int:
    """SIGTERM (unless already sent), then SIGKILL after the grace period; returns the exit code."""
    if proc.poll() is None:
        if signal_first:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


@contextlib.contextmanager
def uvicorn_thread(app):
    """Serve an ASGI app on a free loopback port from a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn-test")
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(15)


def dataset_folder(root: Path, per_class_train: int, per_class_val: int, junk: bool = True) -> Path:
    """A train/ + val/ folder of hymenoptera photos (first files by name), plus files Graft must skip."""
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for label in ("ants", "bees"):
            target = root / split / label
            target.mkdir(parents=True, exist_ok=True)
            for p in hymenoptera_files(split, label)[:n]:
                shutil.copyfile(p, target / p.name)
    if junk:
        (root / "train" / "ants" / "notes.txt").write_text("not an image")
        (root / "train" / "bees" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def held_out(label: str, n: int, skip: int) -> list[Path]:
    """Val photos of one class that a dataset built with per_class_val=skip never saw."""
    return hymenoptera_files("val", label)[skip:skip + n]


def venv_env(**extra: str) -> dict[str, str]:
    """The environment with the venv's bin first on PATH (as the image's PATH=/opt/venv/bin:...)."""
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in [k for k in env if k.startswith("GRAFT_")]:
        del env[key]  # only what each test sets
    env.update(extra)
    return env
