"""End-to-end benchmark over HTTP: upload -> submit -> model ready -> predict, on the full set.

    python bench/e2e.py                      # starts its own `graft serve` on a temp data dir
    python bench/e2e.py --url http://host:8000 --strategy fine_tune --job '{"epochs": 15}'

Prints submit->ready time, training images/s, val accuracy computed from /predict answers on the
dataset's val/ photos, and single-image predict latency p50/p95.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "hymenoptera"


def zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder.parent))
    return buf.getvalue()


@contextmanager
def own_server(workers: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data_dir = tempfile.mkdtemp(prefix="graft-bench-")
    env = {**os.environ, "GRAFT_DATA_DIR": data_dir, "GRAFT_PORT": str(port), "GRAFT_WORKERS": str(workers)}
    env.pop("GRAFT_DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        time.sleep(3)  # let the worker finish importing torch before the clock starts
        yield url, Path(data_dir)
    finally:
        proc.terminate()
        proc.wait(30)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def run(url: str, dataset: Path, strategy: str, job_extra: dict, latency_requests: int) -> dict:
    client = httpx.Client(base_url=url, timeout=600)
    t0 = time.perf_counter()
    resp = client.post("/v1/datasets", files={"file": ("set.zip", zip_folder(dataset))}, data={"name": dataset.name})
    resp.raise_for_status()
    ds = resp.json()
    upload_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    job = client.post("/v1/jobs", json={"dataset_id": ds["id"], "strategy": strategy, **job_extra}).json()
    while job["status"] in ("queued", "running"):
        time.sleep(0.1)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    ready_s = time.perf_counter() - t0
    if job["status"] != "succeeded":
        raise SystemExit(f"job ended {job['status']}: {job.get('error')}")
    model = client.get(f"/v1/models/{job['model_id']}").json()

    val = [(p, p.parent.name) for p in sorted((dataset / "val").glob("*/*")) if p.is_file()]
    correct = 0
    for start in range(0, len(val), 16):
        batch = val[start:start + 16]
        answer = client.post(f"/v1/models/{model['id']}/predict", params={"top_k": 1},
                             files=[("file", (p.name, p.read_bytes())) for p, _ in batch]).json()
        correct += sum(r["predictions"][0]["label"] == label for r, (_, label) in zip(answer["results"], batch))

    latencies = []
    for i in range(latency_requests):
        p = val[i % len(val)][0]
        t = time.perf_counter()
        client.post(f"/v1/models/{model['id']}/predict", files={"file": (p.name, p.read_bytes())}).raise_for_status()
        latencies.append((time.perf_counter() - t) * 1000)
    m = model["metrics"]
    return {
        "strategy": strategy, "job": job["config"], "images": ds["num_images"], "upload_s": round(upload_s, 2),
        "submit_to_ready_s": round(ready_s, 2), "train_seconds": m["train_seconds"],
        "train_images_per_s": m["train_images_per_s"], "val_accuracy_reported": m["val_accuracy"],
        "val_accuracy_from_predict": round(correct / len(val), 4), "val_images": len(val),
        "predict_p50_ms": round(percentile(latencies, 50), 1), "predict_p95_ms": round(percentile(latencies, 95), 1),
        "device": m.get("device"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running Graft; default: start one")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--strategy", default="linear_probe")
    parser.add_argument("--job", default="{}", help="extra job fields as JSON")
    parser.add_argument("--latency-requests", type=int, default=50)
    args = parser.parse_args()
    extra = json.loads(args.job)
    if args.url:
        result = run(args.url, args.dataset, args.strategy, extra, args.latency_requests)
    else:
        with own_server(workers=1) as (url, _):
            result = run(url, args.dataset, args.strategy, extra, args.latency_requests)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
