"""Predict by alias against predict by id: what resolving the alias adds to a request (p50).

    python bench/alias_predict.py                     # own `graft serve`, trains a tiny probe first
    python bench/alias_predict.py --requests 500 --image-size 224

It starts `graft serve` on a fresh data dir (SQLite, one worker, no predict rate limit), trains a
linear probe on a small hymenoptera subset, points the alias `bench` at it, warms both routes up,
then sends --requests requests to each route from one client, interleaved (id, alias, id, ...)
so that load from elsewhere on the machine falls on both alike. Each request carries one
500x375 JPEG. Prints p50/p95 of each and the difference of the p50s (target: < 1 ms).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import DEFAULT_DATASET, own_server, percentile, train_once, zip_folder  # noqa: E402

IMAGE = DEFAULT_DATASET / "val" / "ants" / "10308379_1b6c72e180.jpg"  # 500x375 JPEG


def timed(client: httpx.Client, path: str, image: bytes) -> float:
    t0 = time.perf_counter()
    resp = client.post(path, files={"file": ("ant.jpg", image, "image/jpeg")})
    elapsed = time.perf_counter() - t0
    resp.raise_for_status()
    return elapsed * 1000


def measure(url: str, requests: int, image_size: int) -> dict:
    image = IMAGE.read_bytes()
    with httpx.Client(base_url=url, timeout=120) as client:
        dataset = client.post("/v1/datasets", files={"file": ("bugs.zip", zip_folder(DEFAULT_DATASET))}).json()
        job, _ = train_once(client, dataset["id"], "linear_probe", {"image_size": image_size, "epochs": 2})
        model_id = job["model_id"]
        client.put("/v1/aliases/bench", json={"model_id": model_id}).raise_for_status()
        by_id, by_alias = f"/v1/models/{model_id}/predict", "/v1/aliases/bench/predict"
        for _ in range(20):  # warm-up: the model cache, the engine, the connection
            timed(client, by_id, image)
            timed(client, by_alias, image)
        times = {"id": [], "alias": []}
        for _ in range(requests):
            times["id"].append(timed(client, by_id, image))
            times["alias"].append(timed(client, by_alias, image))
    out = {name: {"p50_ms": round(percentile(t, 50), 2), "p95_ms": round(percentile(t, 95), 2)}
           for name, t in times.items()}
    out["alias_minus_id_p50_ms"] = round(out["alias"]["p50_ms"] - out["id"]["p50_ms"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="per route")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    with own_server(1, env={"GRAFT_PREDICT_RATE_PER_MINUTE": "0"}) as (url, _):
        result = measure(url, args.requests, args.image_size)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
