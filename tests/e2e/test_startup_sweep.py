"""A server killed mid-upload leaves its staging folder behind; the next start-up removes it.

A real `graft serve` is SIGKILLed while it ingests a zip (its staging folder already holds files),
then started again: the dead upload's folder is gone, and a folder younger than
GRAFT_STAGING_MAX_AGE_S (another process's upload in progress, on a shared data dir) is kept.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.store.blobs import STAGING_PREFIX
from tests.support.data import REPO, subset_zip
from tests.support.live import free_port, venv_env, wait_http

MAX_AGE_S = 60


def start_server(data_dir: Path, log: Path, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT,
                                env=venv_env(GRAFT_DATA_DIR=str(data_dir), GRAFT_PORT=str(port), GRAFT_WORKERS="0",
                                             GRAFT_LOG_FORMAT="json", GRAFT_TORCH_THREADS="1", **env))
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc, log)
    return proc, url


def staged(tmp_dir: Path) -> list[Path]:
    """Staging folders that already hold files."""
    return [d for d in tmp_dir.glob(f"{STAGING_PREFIX}*") if d.is_dir() and any(d.iterdir())]


def backdate(folder: Path, seconds: float) -> None:
    """As if the folder and its files were last touched `seconds` ago."""
    then = time.time() - seconds
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (then, then))


@pytest.mark.e2e
def test_a_restart_sweeps_what_a_killed_upload_left_and_keeps_young_staging(tmp_path):
    data_dir, log = tmp_path / "data", tmp_path / "serve.log"
    proc, url = start_server(data_dir, log)
    tmp_dir = data_dir / "tmp"
    archive = subset_zip(30, 20)  # 100 photos: ingest takes long enough to be caught in the middle
    upload = threading.Thread(target=lambda: _post_ignoring_the_kill(url, archive), daemon=True)
    upload.start()
    deadline = time.monotonic() + 60
    while not staged(tmp_dir) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    leftovers = staged(tmp_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    upload.join(10)
    assert leftovers, f"no staging folder appeared:\n{log.read_text()[-3000:]}"
    left = {d: len(list(d.iterdir())) for d in leftovers if d.exists()}
    assert left and all(n > 0 for n in left.values()), "the kill came after the upload finished"
    for folder in left:
        backdate(folder, 10 * MAX_AGE_S)
    young = tmp_dir / f"{STAGING_PREFIX}in-progress-elsewhere"
    young.mkdir()
    (young / "part").write_bytes(b"still being written")

    again, url = start_server(data_dir, log, GRAFT_STAGING_MAX_AGE_S=str(MAX_AGE_S))
    try:
        assert not any(folder.exists() for folder in left)
        assert (young / "part").read_bytes() == b"still being written"
        swept = [json.loads(line) for line in log.read_text().splitlines()
                 if line.startswith("{") and '"sweep_staging"' in line]
        assert sorted(line["files"] for line in swept) == sorted(left.values())
        assert httpx.get(f"{url}/v1/datasets").json() == []  # the killed upload never became a dataset
    finally:
        again.kill()  # a clean shutdown is test_cli's to check; this saves its seconds
        again.wait(10)


def _post_ignoring_the_kill(url: str, archive: bytes) -> None:
    try:
        httpx.post(f"{url}/v1/datasets", files={"file": ("big.zip", archive, "application/zip")}, timeout=120)
    except httpx.TransportError:
        pass  # the server was killed under it: that is the point
