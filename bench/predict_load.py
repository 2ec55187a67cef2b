"""Prediction under load: wrk against a running Graft, compared with the bare model forward.

    python bench/predict_load.py          # starts its own server, trains a linear probe first
    python bench/predict_load.py --url http://127.0.0.1:8000 --model MODEL_ID

Sends one 500x375 JPEG per request (multipart) at 1, 4 and 16 concurrent connections for
--seconds each and prints p50/p95/p99 latency and images/s, next to the bare single-image rate
of the same model measured in this process (forward only, and decode + preprocess + forward).
Needs `wrk` (Debian/Ubuntu: apt-get install wrk).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import DEFAULT_DATASET, own_server, zip_folder  # noqa: E402

IMAGE = DEFAULT_DATASET / "val" / "ants" / "10308379_1b6c72e180.jpg"  # 500x375 JPEG
BOUNDARY = "graftbenchboundary"

WRK_SCRIPT = """
local f = io.open("{image}", "rb")
local img = f:read("*all")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"
wrk.body = "--{boundary}\\r\\nContent-Disposition: form-data; name=\\"file\\"; filename=\\"x.jpg\\"\\r\\n" ..
           "Content-Type: image/jpeg\\r\\n\\r\\n" .. img .. "\\r\\n--{boundary}--\\r\\n"
done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %d %d %f %f %f %f\\n", summary.requests, errors, summary.duration / 1e6,
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3))
end
"""


def train_model(url: str) -> str:
    client = httpx.Client(base_url=url, timeout=600)
    ds = client.post("/v1/datasets", files={"file": ("set.zip", zip_folder(DEFAULT_DATASET))}).json()
    job = client.post("/v1/jobs", json={"dataset_id": ds["id"], "strategy": "linear_probe"}).json()
    while job["status"] in ("queued", "running"):
        time.sleep(0.2)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    return job["model_id"]


def bare_rates(data_dir: Path | None, url: str, model_id: str, seconds: float) -> dict:
    """Single-image rate of the same model in this process: forward only, and with decoding."""
    from service.predictor import predict
    from workers.artifacts import load_artifact
    from workers.preprocessing import decode_square, eval_crop, normalize

    row = httpx.get(f"{url}/v1/models/{model_id}").json()
    if data_dir is None:
        return {}
    model = load_artifact(data_dir / "models" / model_id, row["sha256"])
    data = IMAGE.read_bytes()
    x = normalize(eval_crop(decode_square(data, model.preprocessing)[None], model.preprocessing), model.preprocessing)

    def rate(fn) -> float:
        fn()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        return n / (time.perf_counter() - start)

    with torch.inference_mode():
        forward = rate(lambda: model.classifier(x))
    full = rate(lambda: predict(model, [("x.jpg", data)], 1))
    return {"bare_forward_img_s": round(forward, 1), "bare_forward_ms": round(1000 / forward, 2),
            "bare_decode_forward_img_s": round(full, 1), "bare_decode_forward_ms": round(1000 / full, 2)}


def run_wrk(url: str, model_id: str, connections: int, seconds: int, script: Path) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script),
                          f"{url}/v1/models/{model_id}/predict?top_k=1"], capture_output=True, text=True, check=True)
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
    requests, errors, duration, p50, p95, p99 = line.split()[1:]
    return {"clients": connections, "requests": int(requests), "errors": int(errors),
            "images_per_s": round(int(requests) / float(duration), 1),
            "p50_ms": round(float(p50), 1), "p95_ms": round(float(p95), 1), "p99_ms": round(float(p99), 1)}


def measure(url: str, model_id: str, data_dir: Path | None, seconds: int) -> dict:
    script = Path(tempfile.mkdtemp()) / "predict.lua"
    script.write_text(WRK_SCRIPT.format(image=IMAGE, boundary=BOUNDARY))
    result = {"model_id": model_id, **bare_rates(data_dir, url, model_id, 5.0)}
    result["load"] = [run_wrk(url, model_id, c, seconds, script) for c in (1, 4, 16)]
    if "bare_forward_img_s" in result:
        for row in result["load"]:
            row["vs_bare_forward"] = round(row["images_per_s"] / result["bare_forward_img_s"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--model")
    parser.add_argument("--data-dir", type=Path, help="the server's data dir, for the bare-model baseline")
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    if args.url:
        model_id = args.model or train_model(args.url)
        print(json.dumps(measure(args.url, model_id, args.data_dir, args.seconds), indent=2))
        return
    with own_server(workers=1) as (url, data_dir):
        model_id = train_model(url)
        print(json.dumps(measure(url, model_id, Path(data_dir), args.seconds), indent=2))


if __name__ == "__main__":
    main()
