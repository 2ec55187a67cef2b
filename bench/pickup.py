"""Job pickup latency: how long a submitted job waits before an idle worker starts it.

    python bench/pickup.py                       # SQLite and PostgreSQL, 20 jobs each
    python bench/pickup.py --database sqlite --jobs 50
    python bench/pickup.py --repo /tmp/graft-old  # the same measurement on another checkout

For each database it starts `graft serve` with one worker (a separate `graft worker` process, as
in production) on a fresh data dir (and, for PostgreSQL, a fresh database on --pg-admin-url),
uploads a 6-image dataset, then submits tiny jobs one at a time over HTTP. Each is submitted
0.3-1.0 s (random) after the previous one ended, so the worker is idle and submissions fall at
random points of its poll cycle. Pickup = the job's `started_at` (stamped by the worker's claim)
minus the wall-clock time just before the POST; server and benchmark share the machine's clock.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import random
import statistics
import sys
import time
import uuid
import zipfile
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import DEFAULT_DATASET as HYMENOPTERA, REPO, own_server  # noqa: E402

JOB = {"strategy": "linear_probe", "image_size": 32, "epochs": 1}
SERVER_ENV = {"GRAFT_MIN_IMAGES_PER_CLASS": "2", "GRAFT_TORCH_THREADS": "1"}  # tiny jobs, one worker process


def tiny_zip() -> bytes:
    """2 train + 1 val photos per class: enough to train, quick to run."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split, n in (("train", 2), ("val", 1)):
            for label in ("ants", "bees"):
                for p in sorted((HYMENOPTERA / split / label).iterdir())[:n]:
                    zf.write(p, f"{split}/{label}/{p.name}")
    return buf.getvalue()


@contextmanager
def postgres_database(admin_url: str):
    name = f"graft_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def measure(url: str, jobs: int) -> list[float]:
    client = httpx.Client(base_url=url, timeout=120)
    resp = client.post("/v1/datasets", files={"file": ("tiny.zip", tiny_zip())})
    resp.raise_for_status()
    dataset_id = resp.json()["id"]
    pickups = []
    for _ in range(jobs):
        time.sleep(random.uniform(0.3, 1.0))
        submitted = datetime.now(timezone.utc)
        resp = client.post("/v1/jobs", json={"dataset_id": dataset_id, **JOB})
        resp.raise_for_status()
        job = resp.json()
        while job["status"] in ("queued", "running"):
            time.sleep(0.05)
            job = client.get(f"/v1/jobs/{job['id']}").json()
        if job["status"] != "succeeded" or job["attempts"] != 1:
            raise SystemExit(f"job {job['id']} ended {job['status']} after {job['attempts']} attempts")
        pickups.append((datetime.fromisoformat(job["started_at"]) - submitted).total_seconds())
    return pickups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--pg-admin-url", default=os.environ.get(
        "GRAFT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose `graft serve` runs")
    args = parser.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} cores, {datetime.now().date()}, repo {args.repo}")
    for database in ("sqlite", "postgres") if args.database == "both" else (args.database,):
        with postgres_database(args.pg_admin_url) if database == "postgres" else nullcontext(None) as db_url:
            env = {**SERVER_ENV, **({"GRAFT_DATABASE_URL": db_url} if db_url else {})}
            with own_server(1, env, args.repo) as (url, _):
                time.sleep(2)  # past the worker's first claim: from here on it waits
                pickups = measure(url, args.jobs)
        ms = sorted(p * 1000 for p in pickups)
        print(f"{database:8s} {len(ms)} jobs: pickup p50 {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms, "
              f"min {ms[0]:.1f} ms, mean {statistics.fmean(ms):.1f} ms")


if __name__ == "__main__":
    main()
