"""Several API processes: `graft serve --api-processes 2` beside a second replica on another port,
one PostgreSQL and one Redis; a project's rate limit holds in total across all three processes."""
from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from service.api.auth import create_key, create_project
from service.store.db import Database
from tests.support.live import child_pids, free_port, stop, venv_env, wait_http

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]
REDIS_URL = "redis://127.0.0.1:6379/0"
LIMIT = 4


def spawned(pid: int) -> list[int]:
    """The children uvicorn's supervisor started (multiprocessing spawn), one per API process."""
    return [c for c in child_pids(pid)
            if b"multiprocessing.spawn" in Path(f"/proc/{c}/cmdline").read_bytes()]


def serve(tmp_path: Path, name: str, database_url: str, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = tmp_path / f"{name}.log"
    env = venv_env(GRAFT_DATA_DIR=str(tmp_path / name), GRAFT_DATABASE_URL=database_url, GRAFT_PORT=str(port),
                   GRAFT_WORKERS="0", GRAFT_AUTH_REQUIRED="1", GRAFT_RATE_LIMIT_STORAGE=REDIS_URL,
                   GRAFT_UPLOAD_RATE_PER_MINUTE=str(LIMIT), GRAFT_TORCH_THREADS="1", GRAFT_LOG_FORMAT="json")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--no-migrate", *extra], env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log


def test_a_rate_limit_holds_in_total_across_api_processes_and_replicas(tmp_path, postgres_url):
    db = Database(postgres_url)
    with db.session() as s:
        project = create_project(s, f"replicas-{uuid.uuid4().hex[:8]}")
        _, key = create_key(s, project.id, "k", "admin")
    db.dispose()
    (a, url_a, log_a), (b, url_b, log_b) = (serve(tmp_path, "a", postgres_url, "--api-processes", "2"),
                                            serve(tmp_path, "b", postgres_url))
    try:
        wait_http(f"{url_a}/readyz", a, log_a, timeout=240)  # three processes import torch at once
        wait_http(f"{url_b}/readyz", b, log_b, timeout=240)
        assert len(spawned(a.pid)) == 2, child_pids(a.pid)  # two API processes behind url_a
        answers = []
        for i in range(3 * LIMIT):
            url = (url_a, url_b)[i % 2]
            with httpx.Client(timeout=30) as client:  # a new connection each time: either process of a
                r = client.post(f"{url}/v1/datasets", headers={"Authorization": f"Bearer {key}"},
                                files={"file": ("x.zip", b"not a zip")})
            answers.append((url, r.status_code, r.headers.get("retry-after")))
        codes = [code for _, code, _ in answers]
        assert codes.count(422) == LIMIT and codes.count(429) == 2 * LIMIT, answers  # counted once, in Redis
        assert codes[:LIMIT] == [422] * LIMIT  # the first LIMIT pass, whichever process took them
        assert {url for url, code, _ in answers if code == 429} == {url_a, url_b}
        assert all(int(after) >= 1 for _, code, after in answers if code == 429)
    finally:
        stop(a)
        stop(b)
    assert not spawned(a.pid)
