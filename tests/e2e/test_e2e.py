"""The whole flow through HTTP against `graft serve` with a real worker process, on CPU.

Upload a stratified slice of hymenoptera -> train -> predict held-out photos, and check the
model is right far more often than chance; then the other paths a user meets on a live server.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.data import REPO, hymenoptera_files, subset_zip

pytestmark = pytest.mark.e2e
TRAIN_PER_CLASS, VAL_PER_CLASS = 20, 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("graft-e2e")
    port = free_port()
    env = {**os.environ, "GRAFT_DATA_DIR": str(data_dir), "GRAFT_PORT": str(port), "GRAFT_WORKERS": "1",
           "GRAFT_HEARTBEAT_INTERVAL_S": "1", "GRAFT_POLL_INTERVAL_S": "0.2"}
    env.pop("GRAFT_DATABASE_URL", None)
    log = open(data_dir / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deadline = time.monotonic() + 60
    while True:
        try:
            if client.get("/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("graft serve did not start:\n" + (data_dir / "serve.log").read_text())
        time.sleep(0.3)
    yield client
    proc.terminate()
    proc.wait(30)
    client.close()


def wait_for(client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")


def held_out() -> list[tuple[str, bytes, str]]:
    """Val photos the training upload never saw."""
    return [(p.name, p.read_bytes(), label) for label in ("ants", "bees")
            for p in hymenoptera_files("val", label)[VAL_PER_CLASS:VAL_PER_CLASS + 15]]


def accuracy_from_predict(client, model_id: str) -> float:
    images = held_out()
    correct = 0
    for start in range(0, len(images), 8):
        batch = images[start:start + 8]
        resp = client.post(f"/v1/models/{model_id}/predict", params={"top_k": 2},
                           files=[("file", (name, data, "image/jpeg")) for name, data, _ in batch])
        assert resp.status_code == 200, resp.text
        results = resp.json()["results"]
        assert [r["filename"] for r in results] == [name for name, _, _ in batch]  # upload order
        for r, (_, _, label) in zip(results, batch):
            scores = [p["score"] for p in r["predictions"]]
            assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4
            correct += r["predictions"][0]["label"] == label
    return correct / len(images)


@pytest.fixture(scope="module")
def dataset(server) -> dict:
    resp = server.post("/v1/datasets", files={"file": ("bugs.zip", subset_zip(TRAIN_PER_CLASS, VAL_PER_CLASS))},
                       data={"name": "ants-vs-bees"})
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_linear_probe_end_to_end_beats_chance_by_far(server, dataset):
    job = server.post("/v1/jobs", json={"dataset_id": dataset["id"], "strategy": "linear_probe",
                                        "image_size": 160, "epochs": 40}).json()
    assert job["status"] == "queued"
    job = wait_for(server, job["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"]["epoch"] == job["progress"]["epochs"] == 40
    model = server.get(f"/v1/models/{job['model_id']}").json()
    assert model["backbone"] == "efficientnet_lite0" and model["classes"] == ["ants", "bees"]
    metrics = model["metrics"]
    assert metrics["val_accuracy"] >= 0.8
    assert metrics["confusion_matrix"]["labels"] == ["ants", "bees"]
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 2 * VAL_PER_CLASS
    assert metrics["per_class"]["bees"]["support"] == VAL_PER_CLASS
    assert accuracy_from_predict(server, model["id"]) >= 0.8  # chance is 0.5


def test_fine_tune_end_to_end_learns(server, dataset):
    job = server.post("/v1/jobs", json={"dataset_id": dataset["id"], "strategy": "fine_tune", "epochs": 3,
                                        "image_size": 112, "batch_size": 16, "augmentation": "light"}).json()
    job = wait_for(server, job["id"])
    assert job["status"] == "succeeded", job
    model = server.get(f"/v1/models/{job['model_id']}").json()
    assert len(model["metrics"]["history"]) == 3
    assert accuracy_from_predict(server, model["id"]) >= 0.7


def test_cancel_running_job_stops_it_and_leaves_no_model(server, dataset):
    job = server.post("/v1/jobs", json={"dataset_id": dataset["id"], "strategy": "fine_tune", "epochs": 200,
                                        "image_size": 96}).json()
    deadline = time.monotonic() + 60
    while server.get(f"/v1/jobs/{job['id']}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert server.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    job = wait_for(server, job["id"], timeout=30)
    assert job["status"] == "cancelled" and job["model_id"] is None
    assert job["id"] not in [m["job_id"] for m in server.get("/v1/models").json()]


def test_predict_rejects_an_undecodable_image_and_the_server_stays_up(server, dataset):
    models = server.get("/v1/models").json()
    assert models, "an earlier test trains a model"
    model_id = models[0]["id"]
    ok = hymenoptera_files("val", "bees")[0].read_bytes()
    resp = server.post(f"/v1/models/{model_id}/predict",
                       files=[("file", ("fine.jpg", ok)), ("file", ("broken.jpg", ok[:300]))])
    assert resp.status_code == 422 and resp.headers["content-type"].startswith("application/problem+json")
    assert "broken.jpg" in resp.json()["detail"]
    assert server.get("/healthz").status_code == 200
    top1 = server.post(f"/v1/models/{model_id}/predict", params={"top_k": 10}, files={"file": ("x.jpg", ok)})
    assert len(top1.json()["results"][0]["predictions"]) == 2  # top_k capped at the number of classes


def readme_blocks() -> list[list[str]]:
    """The shell commands of each of the README walk-through's code blocks, continuation lines joined."""
    text = (REPO / "README.md").read_text().split("## Train and use a classifier", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for block in text.split("```sh")[1:]:
        commands, current = [], ""
        for line in block.split("```", 1)[0].splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            current += line.removesuffix("\\").strip() + " "
            if not line.endswith("\\"):
                commands.append(current.strip())
                current = ""
        blocks.append(commands)
    return blocks


def run_as_written(command: str, server, cwd, ids: dict) -> str:
    """One README command in a fresh folder (no ../shared), the ids it printed before filled in."""
    command = command.replace("http://127.0.0.1:8000", str(server.base_url).rstrip("/"))
    for name, value in ids.items():
        command = command.replace(f"<{name}>", value)
    assert "<" not in command.replace("'", ""), f"unfilled placeholder in: {command}"
    env = {**os.environ, "GRAFT_URL": str(server.base_url), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (command, done.stdout, done.stderr)
    return done.stdout


def test_readme_walkthrough_runs_as_written(server, tmp_path):
    """Run the README's commands one by one against the live server, in a folder that has nothing
    but what they make: the CLI steps from `graft datasets sample`, then the same over HTTP."""
    cli, http = readme_blocks()
    assert cli[0] == "source .venv/bin/activate"  # the venv's bin is on PATH below instead
    ids: dict[str, str] = {}
    for command in cli[1:]:
        out = run_as_written(command, server, tmp_path, ids)
        if command.startswith("graft datasets upload"):
            ids["DATASET_ID"] = re.search(r"\bid ([0-9a-f]{32})\b", out).group(1)
        elif command.startswith("graft train"):
            found = re.search(r"\bmodel\s+([0-9a-f]{32})\b", out)
            assert found, out
            ids["MODEL_ID"] = found.group(1)
        elif command.startswith("graft predict"):
            assert re.search(r"EO_110764\.jpg.*?eosinophil", out, re.S) and "lymphocyte" in out, out
    assert {"DATASET_ID", "MODEL_ID"} <= set(ids) and list(tmp_path.glob("graft-*-onnx.zip"))
    assert sum("curl" in c for c in http) == 5
    ids = {}
    for command in http:
        out = run_as_written(command, server, tmp_path, ids)
        if "curl" not in command:
            continue
        answer = json.loads(out)
        if "classes" in answer and "num_images" in answer:
            assert len(answer["classes"]) == 8 and answer["num_images"] == 160 and not answer["rejected"]
            ids["DATASET_ID"] = answer["id"]
        elif "/v1/jobs/" in command:
            job = wait_for(server, ids["JOB_ID"])
            assert job["status"] == "succeeded", job
            ids["MODEL_ID"] = job["model_id"]
        elif answer.get("status") == "queued":
            ids["JOB_ID"] = answer["id"]
        elif "results" in answer:
            assert [r["predictions"][0]["label"] for r in answer["results"]] == ["eosinophil", "lymphocyte"]
        else:
            assert answer["metrics"]["val_accuracy"] >= 0.6  # 8 classes: chance is 0.125
    assert set(ids) == {"DATASET_ID", "JOB_ID", "MODEL_ID"}
