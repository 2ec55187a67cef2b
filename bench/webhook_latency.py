"""Webhook latency: from a job's end to its job.succeeded arriving at a receiver.

    python bench/webhook_latency.py                        # SQLite and PostgreSQL, 10 jobs each
    python bench/webhook_latency.py --database sqlite --jobs 30

For each database it starts `graft serve` with one worker (a separate process, as in production)
on a fresh data dir, with GRAFT_WEBHOOK_ALLOW_PRIVATE=1 so the API may deliver to a receiver on
127.0.0.1 (an http.server thread in this process), registers a webhook for job.succeeded and runs
tiny real jobs one at a time. Latency = when the receiver got the request minus the job's
`finished_at` (stamped in the worker's publishing transaction); one machine, one clock. The
dispatcher polls every GRAFT_WEBHOOK_POLL_S (default 0.2 s); the target is under 1 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import own_server  # noqa: E402
from pickup import JOB, SERVER_ENV, postgres_database, tiny_zip  # noqa: E402

ENV = {**SERVER_ENV, "GRAFT_WEBHOOK_ALLOW_PRIVATE": "1"}


def receiver() -> tuple[ThreadingHTTPServer, dict[str, float]]:
    """A loopback receiver; maps each event's job id to when it arrived."""
    arrived: dict[str, float] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            arrived[json.loads(body)["data"]["job_id"]] = time.time()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, arrived


def measure(url: str, jobs: int) -> list[float]:
    server, arrived = receiver()
    client = httpx.Client(base_url=url, timeout=120)
    client.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{server.server_address[1]}/hook",
                                      "events": ["job.succeeded"]}).raise_for_status()
    resp = client.post("/v1/datasets", files={"file": ("tiny.zip", tiny_zip())})
    resp.raise_for_status()
    latencies = []
    for _ in range(jobs):
        job = client.post("/v1/jobs", json={"dataset_id": resp.json()["id"], **JOB}).json()
        while job["status"] in ("queued", "running"):
            time.sleep(0.05)
            job = client.get(f"/v1/jobs/{job['id']}").json()
        deadline = time.monotonic() + 10
        while job["id"] not in arrived and time.monotonic() < deadline:
            time.sleep(0.01)
        if job["status"] != "succeeded" or job["id"] not in arrived:
            raise SystemExit(f"job {job['id']} {job['status']}; delivered: {job['id'] in arrived}")
        latencies.append(arrived[job["id"]] - datetime.fromisoformat(job["finished_at"]).timestamp())
    server.shutdown()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--pg-admin-url", default=os.environ.get(
        "GRAFT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args()
    print(f"# {platform.machine()}, {platform.python_version()}, {os.cpu_count()} cores")
    for database in (["sqlite", "postgres"] if args.database == "both" else [args.database]):
        with postgres_database(args.pg_admin_url) if database == "postgres" else nullcontext() as pg_url:
            env = {**ENV, **({"GRAFT_DATABASE_URL": pg_url} if pg_url else {})}
            with own_server(1, env) as (url, _):
                ms = sorted(1000 * s for s in measure(url, args.jobs))
        p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
        print(f"{database}: {len(ms)} jobs, job end -> delivered: median {statistics.median(ms):.0f} ms, "
              f"p95 {p95:.0f} ms, max {ms[-1]:.0f} ms")


if __name__ == "__main__":
    main()
