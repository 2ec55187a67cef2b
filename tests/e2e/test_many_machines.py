"""Many machines on one: the API and two workers as separate processes, each with a data dir of its
own (only a cache), no shared filesystem, on PostgreSQL and a real S3 server (SeaweedFS).

1. The README flow: upload, train, predict, export; the model written by a worker, served and
   exported by the API from the bucket.
2. A worker SIGKILLed mid-job: the other one resumes the job from its checkpoint in the bucket.
3. The S3 server stopped during an upload (a 503 with Retry-After, no dataset, nothing
   half-written) and during a job (put back in the queue, not failed; done once the store is back).
"""
from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.support.data import hymenoptera_files, make_zip, subset_zip
from tests.support.live import free_port, stop, venv_env, wait_http
from tests.support.s3 import BUCKET, WeedServer, object_keys, read_after_restart, s3_client, s3_env

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]
PREFIX = "many-machines"


def images_zip(start: int, n: int) -> bytes:
    """Photos no earlier dataset of this test holds (so no worker has them cached)."""
    return make_zip({f"{split}/{label}/{p.name}": p.read_bytes()
                     for split, count in (("train", n), ("val", max(2, n // 2)))
                     for label in ("ants", "bees")
                     for p in hymenoptera_files(split, label)[start:start + count]})


class Machines:
    def __init__(self, tmp_path: Path, database_url: str, weed: WeedServer):
        self.tmp, self.weed = tmp_path, weed
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = venv_env(GRAFT_DATABASE_URL=database_url, GRAFT_STORAGE_URL=f"s3://{BUCKET}/{PREFIX}",
                            GRAFT_STORAGE_TIMEOUT_S="2", GRAFT_STORAGE_MAX_ATTEMPTS="1",
                            GRAFT_STORAGE_RETRY_AFTER_S="1", GRAFT_HEARTBEAT_INTERVAL_S="0.5",
                            GRAFT_POLL_INTERVAL_S="0.2", GRAFT_RETRY_BACKOFF_S="0", GRAFT_CHECKPOINT_INTERVAL_S="0",
                            GRAFT_TORCH_THREADS="1", GRAFT_LOG_FORMAT="json", **s3_env(weed.endpoint))
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *argv: str, **env: str) -> subprocess.Popen:
        data_dir = self.tmp / name  # this "machine's" own disk
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", *argv],
                                env={**self.env, "GRAFT_DATA_DIR": str(data_dir), **env},
                                stdout=(self.tmp / f"{name}.log").open("ab"), stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for proc in self.procs.values():  # all at once, then each gets its grace
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            stop(proc, grace_s=15, signal_first=False)


@pytest.fixture
def machines(tmp_path, postgres_url):
    weed = WeedServer(tmp_path / "weed").start()
    m = Machines(tmp_path, postgres_url, weed)
    api = m.start("api", "serve", "--no-migrate", GRAFT_PORT=str(m.port), GRAFT_WORKERS="0")
    m.start("worker-1", "worker", "--device", "cpu")
    m.start("worker-2", "worker", "--device", "cpu")
    try:
        wait_http(f"{m.url}/readyz", api, tmp_path / "api.log", timeout=240)
        yield m
    finally:
        m.close()
        weed.close()


def wait_job(client: httpx.Client, job_id: str, timeout_s: float = 240, until=("succeeded", "failed", "cancelled")):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']}: {job}")


def running_worker_pid(client: httpx.Client, job_id: str) -> int:
    events = client.get(f"/v1/jobs/{job_id}/events").json()
    worker_id = [e for e in events if e["data"].get("status") == "running"][-1]["data"]["worker_id"]
    return int(worker_id.split(":")[1])


def test_the_api_and_two_workers_share_nothing_but_postgres_and_the_bucket(machines):
    m = machines
    with httpx.Client(base_url=m.url, timeout=60) as client:
        # 1. The README flow, across machines.
        dataset = client.post("/v1/datasets", files={"file": ("bugs.zip", subset_zip(6, 3))}).json()
        resp = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "strategy": "linear_probe",
                                             "image_size": 64, "epochs": 3})
        assert resp.status_code == 202, resp.text
        job = wait_job(client, resp.json()["id"])
        assert job["status"] == "succeeded", job
        photo = hymenoptera_files("val", "bees")[0]
        answer = client.post(f"/v1/models/{job['model_id']}/predict", files={"file": (photo.name, photo.read_bytes())})
        assert answer.status_code == 200 and answer.json()["results"][0]["predictions"]
        export = client.get(f"/v1/models/{job['model_id']}/export", params={"format": "onnx"})
        assert export.status_code == 200 and "model.onnx" in zipfile.ZipFile(io.BytesIO(export.content)).namelist()
        keys = object_keys(m.weed.endpoint, PREFIX)
        assert f"{PREFIX}/models/{job['model_id']}/model.safetensors" in keys
        assert not (m.tmp / "api" / "models").exists() and not (m.tmp / "worker-1" / "blobs").exists()

        # 2. A worker killed mid-job: the other resumes from the checkpoint in the bucket.
        long = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "strategy": "fine_tune",
                                             "image_size": 64, "epochs": 5, "batch_size": 4}).json()
        deadline = time.monotonic() + 180
        while (checkpointed := client.get(f"/v1/jobs/{long['id']}").json())["checkpoint_epoch"] is None:
            assert time.monotonic() < deadline and checkpointed["status"] in ("queued", "running"), checkpointed
            time.sleep(0.1)
        victim = running_worker_pid(client, long["id"])
        os.kill(victim, signal.SIGKILL)
        done = wait_job(client, long["id"])
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2 and done["attempt_history"][0]["error_code"] == "worker_lost"
        assert running_worker_pid(client, long["id"]) != victim
        events = client.get(f"/v1/jobs/{long['id']}/events").json()
        second_start = max(i for i, e in enumerate(events) if e["data"].get("status") == "running")
        epochs_after = [e["data"]["epoch"] for e in events[second_start:] if e["kind"] == "epoch"]
        assert epochs_after and epochs_after[0] > 1, events  # resumed after the checkpoint, not from epoch 1
        m.start("worker-1b", "worker", "--device", "cpu")  # the killed machine's replacement

        # 3a. The store stopped during an upload: 503 + Retry-After, no dataset, nothing half-written.
        before = len(client.get("/v1/datasets").json())
        m.weed.stop()
        refused = client.post("/v1/datasets", files={"file": ("more.zip", images_zip(20, 5))})
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert len(client.get("/v1/datasets").json()) == before
        m.weed.start()
        s3 = s3_client(m.weed.endpoint)
        for key in object_keys(m.weed.endpoint, f"{PREFIX}/blobs/"):  # every object there is whole
            assert hashlib.sha256(read_after_restart(s3, key)).hexdigest() == key.rsplit("/", 1)[1]

        # 3b. The store stopped during a job: the job waits in the queue, then succeeds.
        fresh = client.post("/v1/datasets", files={"file": ("more.zip", images_zip(20, 5))})
        assert fresh.status_code == 201, fresh.text
        m.weed.stop()
        waiting = client.post("/v1/jobs", json={"dataset_id": fresh.json()["id"], "strategy": "linear_probe",
                                                "image_size": 64, "epochs": 3}).json()
        deadline = time.monotonic() + 120
        while not any(e["data"].get("error_code") == "storage_unavailable"
                      for e in client.get(f"/v1/jobs/{waiting['id']}/events").json()):
            assert time.monotonic() < deadline, client.get(f"/v1/jobs/{waiting['id']}").json()
            time.sleep(0.2)
        assert client.get(f"/v1/jobs/{waiting['id']}").json()["status"] in ("queued", "running")
        m.weed.start()
        finished = wait_job(client, waiting["id"])
        assert finished["status"] == "succeeded" and finished["attempts"] == 1, finished
        models = {k.split("/")[2] for k in object_keys(m.weed.endpoint, f"{PREFIX}/models/")}
        assert models == {job["model_id"], done["model_id"], finished["model_id"]}  # no orphan of an attempt

