"""Explaining one photo over HTTP: POST /v1/models/{id}/explain against /predict, p50 and p95.

    python bench/explain.py                       # own `graft serve`, trains a Lite0 probe first
    python bench/explain.py --requests 50 --image-size 224

It starts `graft serve` on a fresh data dir (one worker, no predict rate limit), trains a linear
probe (Lite0, --image-size) on hymenoptera, warms the routes up, then sends --requests requests of
one 500x375 JPEG to each of predict, explain (Grad-CAM) and explain with method=gradcampp and the
raw map, interleaved so that load from elsewhere on the machine falls on all alike. The explain
answer holds the PNG overlay (224 x 224, base64). Target (issue 19): explain p50 <= 150 ms on a
2-core CPU.
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


def timed(client: httpx.Client, path: str, image: bytes, params: dict) -> float:
    t0 = time.perf_counter()
    resp = client.post(path, params=params, files={"file": ("ant.jpg", image, "image/jpeg")})
    elapsed = time.perf_counter() - t0
    resp.raise_for_status()
    return elapsed * 1000


def measure(url: str, requests: int, image_size: int) -> dict:
    image = IMAGE.read_bytes()
    with httpx.Client(base_url=url, timeout=120) as client:
        dataset = client.post("/v1/datasets", files={"file": ("bugs.zip", zip_folder(DEFAULT_DATASET))}).json()
        job, _ = train_once(client, dataset["id"], "linear_probe", {"image_size": image_size, "epochs": 2})
        model = f"/v1/models/{job['model_id']}"
        routes = {"predict": (f"{model}/predict", {}), "explain": (f"{model}/explain", {}),
                  "explain_gradcampp_raw": (f"{model}/explain", {"method": "gradcampp", "raw": "true"})}
        for _ in range(10):  # warm-up: the model cache, the engine, the explain copy, the connection
            for path, params in routes.values():
                timed(client, path, image, params)
        times = {name: [] for name in routes}
        for _ in range(requests):
            for name, (path, params) in routes.items():
                times[name].append(timed(client, path, image, params))
    return {name: {"p50_ms": round(percentile(t, 50), 1), "p95_ms": round(percentile(t, 95), 1)}
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50, help="per route")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    with own_server(1, env={"GRAFT_PREDICT_RATE_PER_MINUTE": "0"}) as (url, _):
        result = measure(url, args.requests, args.image_size)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
