"""Real `graft worker` processes on PostgreSQL: nothing lost, nothing run twice, prompt cancel,
graceful hand-back on SIGTERM, stale workers' late writes rejected, retries, live events (SSE)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.app import create_app
from service.store.db import Database
from service.settings import Settings
from service.store.tables import Job, JobEvent, Model
from tests.support.data import REPO, hymenoptera_files, make_zip

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]
HEARTBEAT_S = 0.5
TINY_JOB = {"strategy": "linear_probe", "image_size": 32, "epochs": 1}
LONG_JOB = {"strategy": "fine_tune", "image_size": 64, "epochs": 300, "batch_size": 2}


@pytest.fixture
def pool_settings(postgres_url, tmp_path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", database_url=postgres_url, heartbeat_interval_s=HEARTBEAT_S,
                 poll_interval_s=0.1, retry_backoff_s=0.2, cancel_poll_s=0.2, reaper_in_api=False,
                 max_concurrent_jobs=0,
                 min_images_per_class=2)  # the tiny fixture dataset below has 3 per class
    s.ensure_dirs()
    return s


@pytest.fixture
def api(pool_settings):
    with TestClient(create_app(pool_settings)) as client:
        yield client


@pytest.fixture
def db(pool_settings):
    database = Database(pool_settings.database_url)
    yield database
    database.dispose()


@pytest.fixture
def dataset_id(api) -> str:
    entries = {f"{split}/{label}/{p.name}": p.read_bytes()
               for split, n in (("train", 2), ("val", 1)) for label in ("ants", "bees")
               for p in hymenoptera_files(split, label)[:n]}
    resp = api.post("/v1/datasets", files={"file": ("tiny.zip", make_zip(entries))})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


class Workers:
    """Starts `graft worker` processes sharing the test's database and data dir."""

    def __init__(self, settings: Settings):
        self.env = {**os.environ, "GRAFT_DATABASE_URL": settings.database_url,
                    "GRAFT_DATA_DIR": str(settings.data_dir), "GRAFT_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
                    "GRAFT_POLL_INTERVAL_S": "0.1", "GRAFT_RETRY_BACKOFF_S": "0.2",
                    "GRAFT_CANCEL_POLL_S": "0.2", "GRAFT_TORCH_THREADS": "1", "GRAFT_CHECKPOINT_INTERVAL_S": "0"}
        self.log_dir = settings.data_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, **env) -> subprocess.Popen:
        log = open(self.log_dir / f"worker-{len(self.procs)}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], cwd=REPO,
                                env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait(30)


@pytest.fixture
def workers(pool_settings):
    pool = Workers(pool_settings)
    yield pool
    pool.stop_all()


def submit(api, dataset_id: str, **config) -> str:
    resp = api.post("/v1/jobs", json={"dataset_id": dataset_id, **config})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def wait_status(api, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not in {statuses} after {timeout}s: {job}")


def wait_training(api, job_id: str, timeout: float = 120) -> dict:
    """Until the job has done at least one training step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"].get("step"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never started training: {job}")


def test_four_workers_twenty_jobs_each_runs_exactly_once(api, db, dataset_id, workers):
    ids = [submit(api, dataset_id, **TINY_JOB, seed=i) for i in range(20)]
    for _ in range(4):
        workers.start()
    for job_id in ids:
        assert wait_status(api, job_id, ("succeeded", "failed"), timeout=300)["status"] == "succeeded"
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Model)) == 20
        assert {m.job_id for m in s.scalars(select(Model))} == set(ids)
        for job in s.scalars(select(Job)):
            assert job.attempts == 1 and job.model_id
            statuses = [e.data["status"] for e in s.scalars(select(JobEvent).where(
                JobEvent.job_id == job.id, JobEvent.kind == "status").order_by(JobEvent.id))]
            assert statuses == ["queued", "running", "succeeded"], (job.id, statuses)
        runners = {e.data["worker_id"] for e in s.scalars(select(JobEvent).where(JobEvent.kind == "status"))
                   if e.data.get("status") == "running"}
    assert len(runners) >= 2, "the jobs should spread over the workers"
    live = api.get("/v1/workers").json()
    assert len(live) == 4 and all(w["device"] == "cpu" for w in live)


def test_cancel_stops_a_running_job_within_seconds_and_leaves_no_model(api, db, dataset_id, workers):
    workers.start()
    job_id = submit(api, dataset_id, **LONG_JOB)
    wait_training(api, job_id)
    asked = time.monotonic()
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    job = wait_status(api, job_id, ("cancelled", "succeeded", "failed"), timeout=30)
    took = time.monotonic() - asked
    assert job["status"] == "cancelled" and job["model_id"] is None
    assert took < 5, f"cancel took {took:.1f}s"
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Model)) == 0
    # The worker is free again: a new job runs.
    assert wait_status(api, submit(api, dataset_id, **TINY_JOB), ("succeeded",))["model_id"]


def test_sigterm_hands_the_running_job_back_and_another_worker_finishes_it(api, db, dataset_id, workers):
    first = workers.start(GRAFT_SHUTDOWN_GRACE_S="0")
    job_id = submit(api, dataset_id, **{**LONG_JOB, "epochs": 3})
    wait_training(api, job_id)
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0
    handed_back = api.get(f"/v1/jobs/{job_id}").json()
    assert handed_back["status"] == "queued" and handed_back["attempts"] == 0
    workers.start()
    job = wait_status(api, job_id, ("succeeded", "failed"), timeout=180)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Model).where(Model.job_id == job_id)) == 1


def test_a_stopped_worker_past_its_lease_is_superseded_and_its_late_writes_rejected(api, db, dataset_id, workers):
    first = workers.start()
    job_id = submit(api, dataset_id, **{**LONG_JOB, "epochs": 4})
    wait_training(api, job_id)
    os.kill(first.pid, signal.SIGSTOP)
    second = workers.start()  # its reaper re-queues the silent job, then it claims it
    job = wait_status(api, job_id, ("running",), timeout=60)
    deadline = time.monotonic() + 60
    while api.get(f"/v1/jobs/{job_id}").json()["attempts"] < 2:
        assert time.monotonic() < deadline, "the stalled job was never taken over"
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGCONT)
    job = wait_status(api, job_id, ("succeeded", "failed"), timeout=180)
    assert job["status"] == "succeeded"
    with db.session() as s:
        models = list(s.scalars(select(Model).where(Model.job_id == job_id)))
        assert len(models) == 1 and models[0].id == job["model_id"]
        running = [e.data["worker_id"] for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id))
                   if e.kind == "status" and e.data.get("status") == "running"]
    assert len(running) == 2 and running[0] != running[1]
    assert "worker_lost" in json.dumps(job["attempt_history"])
    log = (workers.log_dir / "worker-0.log").read_text()
    assert "stopped: lost" in log and second.poll() is None


def test_infrastructure_errors_retry_with_backoff_then_fail_with_history(api, db, pool_settings, dataset_id, workers):
    # Simulate lost storage: the dataset's image files are gone, a retryable infrastructure error.
    for blob in pool_settings.blobs_dir.rglob("*"):
        if blob.is_file():
            blob.unlink()
    job_id = submit(api, dataset_id, **TINY_JOB)
    workers.start()
    job = wait_status(api, job_id, ("failed", "succeeded"), timeout=120)
    assert job["status"] == "failed" and job["attempts"] == pool_settings.max_attempts
    history = job["attempt_history"]
    assert [h["attempt"] for h in history] == [1, 2, 3]
    # The store names what is gone (ObjectMissing is its FileNotFoundError, local or S3).
    assert all(h["error_code"] == "internal_error" and "no stored file blobs/" in h["error_message"] for h in history)
    gaps = [(datetime.fromisoformat(b["started_at"]) - datetime.fromisoformat(a["ended_at"])).total_seconds()
            for a, b in zip(history, history[1:])]
    # Backoff 0.2 s x 2^(n-1), jittered to [half, full]: at least 0.1 s then 0.2 s.
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2, gaps
    assert job["error"]["code"] == "internal_error"


def test_a_user_error_fails_on_the_first_attempt(api, dataset_id, workers, monkeypatch, tmp_path):
    workers.start(TORCH_HOME=str(tmp_path / "no-weights"))
    job = wait_status(api, submit(api, dataset_id, backbone="resnet18", **TINY_JOB), ("failed", "succeeded"))
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"]["code"] == "weights_missing" and "GRAFT_ALLOW_DOWNLOADS" in job["error"]["message"]


def test_gpu_jobs_wait_for_a_gpu_worker(api, dataset_id, workers):
    workers.start()
    gpu_job = submit(api, dataset_id, device="gpu", **TINY_JOB)
    cpu_job = submit(api, dataset_id, **TINY_JOB)
    wait_status(api, cpu_job, ("succeeded",))
    assert api.get(f"/v1/jobs/{gpu_job}").json()["status"] == "queued"


def test_event_stream_follows_a_real_job_and_closes_at_the_end(api, dataset_id, workers):
    job_id = submit(api, dataset_id, **{**TINY_JOB, "epochs": 3})
    workers.start()
    events, current = [], {}
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():  # ends when the server closes the stream
            if line.startswith(("id:", "event:", "data:")):
                key, _, value = line.partition(": ")
                current[key] = value
            elif not line and current:
                events.append((int(current["id"]), current["event"], json.loads(current["data"])))
                current = {}
    kinds = [kind for _, kind, _ in events]
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    assert [d["epoch"] for _, kind, d in events if kind == "epoch"] == [1, 2, 3]
    assert [d["status"] for _, kind, d in events if kind == "status"] == ["queued", "running", "succeeded"]
    assert kinds[-1] == "status" and events[-1][2]["status"] == "succeeded"
    as_json = api.get(f"/v1/jobs/{job_id}/events").json()
    assert [e["id"] for e in as_json] == [e[0] for e in events]
    assert api.get(f"/v1/jobs/{job_id}/events", params={"after_id": events[-2][0]}).json()[0]["id"] == events[-1][0]


def test_sigkill_mid_training_resumes_from_checkpoint_and_matches_an_uninterrupted_run(api, db, dataset_id, workers):
    recipe = {"strategy": "fine_tune", "image_size": 64, "epochs": 10, "batch_size": 2, "seed": 5}
    victim = workers.start()
    job_id = submit(api, dataset_id, **recipe)
    deadline = time.monotonic() + 120
    while (api.get(f"/v1/jobs/{job_id}").json()["checkpoint_epoch"] or 0) < 2:
        assert time.monotonic() < deadline, "no checkpoint was recorded"
        time.sleep(0.05)
    victim.kill()
    victim.wait(30)
    workers.start()  # its reaper re-queues the dead worker's job after the lease expires
    resumed = wait_status(api, job_id, ("succeeded", "failed"), timeout=180)
    assert resumed["status"] == "succeeded" and resumed["attempts"] == 2
    events = api.get(f"/v1/jobs/{job_id}/events").json()
    epochs_run = [e["data"]["epoch"] for e in events if e["kind"] == "epoch"]
    assert epochs_run[-1] == 10 and epochs_run.count(1) == 1, f"the retry must not start over: {epochs_run}"
    reference = wait_status(api, submit(api, dataset_id, **recipe), ("succeeded", "failed"), timeout=180)
    with db.session() as s:
        a, b = s.get(Model, resumed["model_id"]), s.get(Model, reference["model_id"])
        assert a.metrics["history"] == b.metrics["history"]
        assert a.metrics["val_accuracy"] == b.metrics["val_accuracy"] and a.sha256 == b.sha256
