"""Memory of many loaded models: the API server's RSS with 1 and with N linear probes loaded.

    python bench/model_memory.py                 # starts its own `graft serve`, N = 100
    python bench/model_memory.py --models 20

Over HTTP, on a fresh `graft serve` (1 worker, SQLite, GRAFT_MODEL_CACHE_MB large enough that
nothing is evicted): trains one `linear_probe` with the defaults on the full dataset, then N - 1
more `linear_probe` jobs (defaults, seed 1..N-1, so every head differs) on a small slice of it
(--slice images per class and split), all on the default backbone at 224 px. Then it reads the
server process's VmRSS (/proc/<pid>/status): before any model is loaded; after one /predict on
the first model; after --warmup more /predicts on that model (RSS can grow over the first
requests whatever the model, likely per-thread malloc arenas of the server's thread pool, so
this reading separates that from the models); after one /predict on each of the other models;
and after a second round over all N (no loads: the noise). Prints the deltas and /metrics'
graft_models_loaded and graft_models_loaded_bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import DEFAULT_DATASET, own_server, server_pid, train_once, zip_folder  # noqa: E402

PHOTO = DEFAULT_DATASET / "val" / "ants" / "10308379_1b6c72e180.jpg"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmRSS line")


def dataset_slice(dataset: Path, per_class: int, into: Path) -> Path:
    """The first `per_class` images of each class in train/ and val/, as a folder to zip."""
    root = into / dataset.name
    for label_dir in sorted(dataset.glob("*/*")):
        if label_dir.parent.name in ("train", "val") and label_dir.is_dir():
            target = root / label_dir.parent.name / label_dir.name
            target.mkdir(parents=True)
            for p in sorted(f for f in label_dir.iterdir() if f.is_file())[:per_class]:
                shutil.copy(p, target / p.name)
    return root


def metric(client: httpx.Client, name: str) -> float:
    line = next(l for l in client.get("/metrics").text.splitlines() if l.startswith(name + " "))
    return float(line.split()[1])


def predict(client: httpx.Client, model_id: str) -> None:
    client.post(f"/v1/models/{model_id}/predict", files={"file": (PHOTO.name, PHOTO.read_bytes())}).raise_for_status()


def run(url: str, data_dir: Path, models: int, per_class: int, warmup: int) -> dict:
    client = httpx.Client(base_url=url, timeout=600)
    pid = server_pid(data_dir)
    if pid is None:
        raise SystemExit(f"no `graft serve` process for {data_dir}")
    full = client.post("/v1/datasets", files={"file": ("full.zip", zip_folder(DEFAULT_DATASET))}).json()
    with tempfile.TemporaryDirectory() as tmp:
        small = client.post("/v1/datasets", files={"file": ("slice.zip", zip_folder(
            dataset_slice(DEFAULT_DATASET, per_class, Path(tmp))))}).json()
    t0 = time.perf_counter()
    first, first_s = train_once(client, full["id"], "linear_probe", {})
    model_ids = [first["model_id"]]
    for seed in range(1, models):
        job, _ = train_once(client, small["id"], "linear_probe", {"seed": seed})
        model_ids.append(job["model_id"])
    train_s = time.perf_counter() - t0
    sizes = [client.get(f"/v1/models/{m}").json()["size_bytes"] for m in model_ids]

    time.sleep(1)
    rss_idle = rss_mib(pid)
    predict(client, model_ids[0])
    rss_one_cold = rss_mib(pid)
    for _ in range(warmup):
        predict(client, model_ids[0])
    rss_one = rss_mib(pid)
    bytes_one = metric(client, "graft_models_loaded_bytes")
    for model_id in model_ids[1:]:
        predict(client, model_id)
    rss_all = rss_mib(pid)
    for model_id in model_ids:
        predict(client, model_id)
    rss_again = rss_mib(pid)
    return {
        "models": models, "first_model_images": full["num_images"], "other_models_images": small["num_images"],
        "train_all_s": round(train_s, 1), "first_model_submit_to_ready_s": round(first_s, 2),
        "artifact_bytes_max": max(sizes), "artifact_bytes_first": sizes[0],
        "rss_idle_mib": round(rss_idle, 1), "rss_1_model_1_request_mib": round(rss_one_cold, 1),
        f"rss_1_model_{1 + warmup}_requests_mib": round(rss_one, 1),
        f"rss_{models}_models_mib": round(rss_all, 1), f"rss_{models}_models_second_round_mib": round(rss_again, 1),
        f"rss_delta_1_to_{models}_models_mib": round(rss_all - rss_one, 1),
        f"rss_delta_1_to_{models}_models_without_warmup_mib": round(rss_all - rss_one_cold, 1),
        "rss_delta_idle_to_1_model_mib": round(rss_one_cold - rss_idle, 1),
        "graft_models_loaded": metric(client, "graft_models_loaded"),
        "graft_models_loaded_bytes_1": int(bytes_one),
        "graft_models_loaded_bytes_all": int(metric(client, "graft_models_loaded_bytes")),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--slice", type=int, default=10, help="images per class and split for models 2..N")
    parser.add_argument("--warmup", type=int, default=100, help="extra /predicts on the first model before "
                        "the 1-model reading")
    parser.add_argument("--cache-mb", type=int, default=4096, help="GRAFT_MODEL_CACHE_MB of the server")
    args = parser.parse_args()
    os.environ["GRAFT_MODEL_CACHE_MB"] = str(args.cache_mb)  # own_server passes the environment on
    with own_server(workers=1) as (url, data_dir):
        result = run(url, data_dir, args.models, args.slice, args.warmup)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
