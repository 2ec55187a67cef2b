"""End-to-end benchmark over HTTP: upload -> submit -> model ready -> predict, on the full set.

    python bench/e2e.py                      # starts its own `graft serve` on a temp data dir
    python bench/e2e.py --url http://host:8000 --strategy fine_tune --job '{"epochs": 15}'
    python bench/e2e.py --strategy fine_tune --job '{"epochs": 15}' --repeat 3   # warm worker

Prints submit->ready time, training images/s, val accuracy computed from /predict answers on the
dataset's val/ photos, and single-image predict latency p50/p95. With --repeat N the same job is
submitted N times in a row on one upload: the first pays for decoding the photos (and anything
else a cold worker does); the later ones show a warm worker, whose decoded images are cached.
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
# GRAFT_HYMENOPTERA: where the shared set is on a machine without ../shared (a lent GPU)
DEFAULT_DATASET = Path(os.environ.get("GRAFT_HYMENOPTERA") or REPO.parent / "shared" / "datasets" / "hymenoptera")


def zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder.parent))
    return buf.getvalue()


@contextmanager
def own_server(workers: int, env: dict | None = None, repo: Path = REPO):
    """`graft serve` on a fresh data dir (SQLite unless `env` names GRAFT_DATABASE_URL), from `repo`;
    yields (url, data dir) once its workers have registered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data_dir = tempfile.mkdtemp(prefix="graft-bench-")
    base = {k: v for k, v in os.environ.items() if k != "GRAFT_DATABASE_URL"}
    env = {**base, "GRAFT_DATA_DIR": data_dir, "GRAFT_PORT": str(port), "GRAFT_WORKERS": str(workers), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:  # a worker registers once it has imported torch (and warmed up a GPU)
                if len(httpx.get(url + "/v1/workers").json()) >= workers:
                    break
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.2)
        else:
            raise SystemExit("graft serve did not register its workers within 180 s")
        yield url, Path(data_dir)
    finally:
        proc.terminate()
        proc.wait(60)


def server_pid(data_dir: Path) -> int | None:
    """The local `graft serve` process (the API; its workers run `graft worker`) serving data_dir."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"service.cli" in argv and b"serve" in argv and f"GRAFT_DATA_DIR={data_dir}".encode() in env:
            return int(entry.name)
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def train_once(client: httpx.Client, dataset_id: str, strategy: str, job_extra: dict) -> tuple[dict, float]:
    """Submit a job and poll it every 20 ms: (the finished job, seconds from submit to ready)."""
    t0 = time.perf_counter()
    resp = client.post("/v1/jobs", json={"dataset_id": dataset_id, "strategy": strategy, **job_extra})
    resp.raise_for_status()
    job = resp.json()
    while job["status"] in ("queued", "running"):
        time.sleep(0.02)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    ready_s = time.perf_counter() - t0
    if job["status"] != "succeeded":
        raise SystemExit(f"job ended {job['status']}: {job.get('error')}")
    return job, ready_s


def run(url: str, dataset: Path, strategy: str, job_extra: dict, latency_requests: int, repeat: int = 1) -> dict:
    client = httpx.Client(base_url=url, timeout=600)
    t0 = time.perf_counter()
    resp = client.post("/v1/datasets", files={"file": ("set.zip", zip_folder(dataset))}, data={"name": dataset.name})
    resp.raise_for_status()
    ds = resp.json()
    upload_s = time.perf_counter() - t0

    runs = [train_once(client, ds["id"], strategy, job_extra) for _ in range(repeat)]
    job, ready_s = runs[-1]
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
        "submit_to_ready_s": round(ready_s, 2),
        "submit_to_ready_each_s": [round(r, 2) for _, r in runs],
        "val_accuracy_each": [client.get(f"/v1/models/{j['model_id']}").json()["metrics"]["val_accuracy"]
                              for j, _ in runs],
        "train_seconds": m["train_seconds"],
        "train_images_per_s": m["train_images_per_s"], "val_accuracy_reported": m["val_accuracy"],
        "val_accuracy_from_predict": round(correct / len(val), 4), "val_images": len(val),
        "predict_p50_ms": round(percentile(latencies, 50), 1), "predict_p95_ms": round(percentile(latencies, 95), 1),
        "device": m.get("device"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "recipe": model.get("recipe"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running Graft; default: start one")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--strategy", default="linear_probe")
    parser.add_argument("--job", default="{}", help="extra job fields as JSON")
    parser.add_argument("--latency-requests", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=1, help="submit the job this many times in a row")
    args = parser.parse_args()
    extra = json.loads(args.job)
    if args.url:
        result = run(args.url, args.dataset, args.strategy, extra, args.latency_requests, args.repeat)
    else:
        with own_server(workers=1) as (url, _):
            result = run(url, args.dataset, args.strategy, extra, args.latency_requests, args.repeat)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
