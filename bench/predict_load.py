"""Prediction under load: many clients against a running Graft, compared with the bare model forward.

    python bench/predict_load.py                    # starts its own server, trains a linear probe first
    python bench/predict_load.py --files-per-request 64 --clients 1,4,8 --device cuda
    python bench/predict_load.py --url http://127.0.0.1:8000 --model MODEL_ID [--data-dir DIR]

Each request carries --files-per-request copies of one 500x375 JPEG (multipart). At each client
count (--clients, each client sends its next request as soon as the last one is answered) it
runs for --seconds and prints p50/p95/p99 latency and images/s, next to the bare rate of the same
model measured in this process at the same batch size on the same device: the forward alone, and
decode + preprocess + forward the way /predict did it before the inference engine. The load comes
from wrk where it is installed (apt-get install wrk) and otherwise, or with --generator python,
from Python threads holding one HTTP connection each (its own CPU cost then counts against the
server's on a small machine). --device is passed to the server as GRAFT_PREDICT_DEVICE. The server
it starts has no predict rate limit (with --url, the server's own limit applies: its 429s count as
errors). Where the API process is local (its own server, or --data-dir), each run also prints that
process's CPU time per image and how many cores it kept busy; with --gil-profile (needs py-spy:
pip install py-spy, and ptrace rights over the server) also how long per image one of its threads
held the GIL, split by stage: that time bounds what one API process can serve, whatever the device.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import DEFAULT_DATASET, cpu_seconds, own_server, percentile, server_pid, zip_folder  # noqa: E402

IMAGE = DEFAULT_DATASET / "val" / "ants" / "10308379_1b6c72e180.jpg"  # 500x375 JPEG
BOUNDARY = "graftbenchboundary"

WRK_SCRIPT = """
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"
done = function(summary, latency, requests)
  local e = summary.errors
  local errors = e.status + e.connect + e.read + e.write + e.timeout
  io.write(string.format("RESULT %d %d %f %f %f %f\\n", summary.requests, errors, summary.duration / 1e6,
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3))
end
"""


def multipart_body(image: bytes, files: int) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x{i}.jpg"\r\n'
             f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n" for i in range(files)]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def train_model(url: str) -> str:
    client = httpx.Client(base_url=url, timeout=600)
    ds = client.post("/v1/datasets", files={"file": ("set.zip", zip_folder(DEFAULT_DATASET))}).json()
    job = client.post("/v1/jobs", json={"dataset_id": ds["id"], "strategy": "linear_probe"}).json()
    while job["status"] in ("queued", "running"):
        time.sleep(0.2)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    return job["model_id"]


def bare_rates(data_dir: Path | None, url: str, model_id: str, image: bytes, batch: int, device: torch.device,
               seconds: float) -> dict:
    """The same model in this process at the same batch size: forward only, and decode + forward."""
    from service.serving.engine import default_threads
    from workers.backbones import freeze_for_cpu
    from workers.artifacts import load_artifact
    from workers.preprocessing import decode_square, eval_crop, normalize

    if data_dir is None:
        return {}
    row = httpx.get(f"{url}/v1/models/{model_id}").json()
    model = load_artifact(data_dir / "models" / model_id, row["sha256"])
    pre, classifier = model.preprocessing, model.classifier.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def inputs():
        return normalize(eval_crop(torch.stack([decode_square(image, pre) for _ in range(batch)]), pre).to(device), pre)

    x = inputs()

    def rate(fn) -> float:
        for _ in range(3):  # warm-up: kernel selection, caches
            fn()
        sync()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        sync()
        return n * batch / (time.perf_counter() - start)

    with torch.inference_mode(), autocast:
        forward = rate(lambda: classifier(x))
        full = rate(lambda: classifier.predict_proba(inputs()).cpu())
    out = {"batch": batch, "bare_forward_img_s": round(forward, 1), "bare_forward_ms": round(1000 * batch / forward, 2),
           "bare_decode_forward_img_s": round(full, 1), "bare_decode_forward_ms": round(1000 * batch / full, 2)}
    frozen = freeze_for_cpu(classifier.features, pre.input_size) if device.type == "cpu" else None
    if frozen is not None:  # what the server's engine runs on a CPU: frozen, on its thread count
        threads = torch.get_num_threads()
        torch.set_num_threads(default_threads())
        with torch.inference_mode():
            out["bare_forward_frozen_img_s"] = round(rate(lambda: classifier.head_logits(frozen(x))), 1)
        out["bare_forward_frozen_threads"] = torch.get_num_threads()
        torch.set_num_threads(threads)
    return out


def run_wrk(url: str, clients: int, seconds: int, script: Path) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--timeout", "30s", "-s", str(script), url],
                         capture_output=True, text=True, check=True)
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
    requests, errors, duration, p50, p95, p99 = line.split()[1:]
    return {"requests": int(requests), "errors": int(errors), "seconds": float(duration),
            "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def run_python(url: str, clients: int, seconds: int, body: bytes) -> dict:
    """Closed-loop clients on threads, one keep-alive connection each (the same load shape as wrk)."""
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    latencies: list[float] = []
    counts = {"requests": 0, "errors": 0}
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)
    stop_at: list[float] = []

    def client():
        with httpx.Client(timeout=60) as http:
            http.get(url.split("/v1/")[0] + "/healthz")  # connect before the clock starts
            ready.wait()
            mine, errors = [], 0
            while (start := time.perf_counter()) < stop_at[0]:
                ok = http.post(url, content=body, headers=headers).status_code == 200
                mine.append(time.perf_counter() - start)
                errors += not ok
            with lock:
                latencies.extend(mine)
                counts["requests"] += len(mine)
                counts["errors"] += errors

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    started = time.perf_counter()
    stop_at.append(started + seconds)
    ready.wait()
    for t in threads:
        t.join()
    return {**counts, "seconds": time.perf_counter() - started,
            **{f"p{q}_ms": percentile([s * 1000 for s in latencies], q) for q in (50, 95, 99)}}


# Where the API process holds the GIL, by the frames on the holder's stack (first match wins).
GIL_STAGES = (("decode_and_crop", ("predict.<locals>.crop",)),
              ("inference_engine", ("service/serving/engine.py",)),
              ("multipart_parsing", ("python_multipart", "starlette/formparsers.py")),
              ("http_and_the_rest", ("",)))
GIL_SAMPLE_HZ = 250


def start_gil_profile(pid: int, seconds: int) -> tuple[subprocess.Popen, Path]:
    """py-spy sampling the stack of whichever server thread holds the GIL, GIL_SAMPLE_HZ times a second."""
    out = Path(tempfile.mkdtemp()) / "gil.txt"
    return subprocess.Popen(["py-spy", "record", "--gil", "--nonblocking", "--rate", str(GIL_SAMPLE_HZ),
                             "--duration", str(seconds), "--format", "raw", "--output", str(out), "--pid", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out


def read_gil_profile(profile: tuple[subprocess.Popen, Path], seconds: int, images_s: float) -> dict:
    """GIL-held share of the wall clock and milliseconds per served image, by stage."""
    spy, out = profile
    _, err = spy.communicate()
    lines = out.read_text().splitlines() if out.exists() else []
    shutil.rmtree(out.parent, ignore_errors=True)
    if spy.returncode != 0 or not lines:
        return {"gil_profile_error": err.strip()[-300:]}
    samples = {name: 0 for name, _ in GIL_STAGES}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        samples[next(name for name, keys in GIL_STAGES if any(k in stack for k in keys))] += int(count)
    to_ms = 1000 / GIL_SAMPLE_HZ / max(images_s * seconds, 1)
    return {"server_gil_busy": round(sum(samples.values()) / GIL_SAMPLE_HZ / seconds, 3),
            "server_gil_ms_per_image": round(sum(samples.values()) * to_ms, 3),
            "server_gil_ms_per_image_by_stage": {name: round(n * to_ms, 3) for name, n in samples.items()}}


def measure(url: str, model_id: str, data_dir: Path | None, args) -> dict:
    image = args.image.read_bytes()
    body = multipart_body(image, args.files_per_request)
    target = f"{url}/v1/models/{model_id}/predict?top_k=1"
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = args.generator or ("wrk" if shutil.which("wrk") else "python")
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    for _ in range(3):  # the first request loads the model (and folds it): not part of any run
        httpx.post(target, content=body, headers=headers, timeout=600).raise_for_status()
    result = {"model_id": model_id, "device": str(device), "generator": generator,
              "files_per_request": args.files_per_request, "image": args.image.name,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "load_before": os.getloadavg(),
              **bare_rates(data_dir, url, model_id, image, args.files_per_request, device, args.bare_seconds)}
    if generator == "wrk":
        script = Path(tempfile.mkdtemp()) / "predict.lua"
        (script.parent / "body").write_bytes(body)
        script.write_text(WRK_SCRIPT.format(body=script.parent / "body", boundary=BOUNDARY))
    # The API process's CPU time per served image says what bounds it: near 1 core busy with the
    # rest idle is the GIL (one Python thread at a time), all cores busy is decoding.
    pid = server_pid(data_dir) if data_dir is not None else None
    if args.gil_profile and not pid:
        raise SystemExit("--gil-profile needs the API process here: its own server, or --data-dir")
    profile_s = max(1, args.seconds - 1)  # py-spy attaches as the run starts and stops before it ends
    rows = []
    for clients in args.clients:
        cpu_before = cpu_seconds(pid) if pid else None
        profile = start_gil_profile(pid, profile_s) if args.gil_profile else None
        run = (run_wrk(target, clients, args.seconds, script) if generator == "wrk"
               else run_python(target, clients, args.seconds, body))
        images = (run["requests"] - run["errors"]) * args.files_per_request
        images_s = images / run["seconds"]
        row = {"clients": clients, "requests": run["requests"], "errors": run["errors"],
               "images_per_s": round(images_s, 1),
               **{k: round(run[k], 1) for k in ("p50_ms", "p95_ms", "p99_ms")}}
        if pid:
            cpu = cpu_seconds(pid) - cpu_before
            row["server_cores_busy"] = round(cpu / run["seconds"], 2)
            row["server_cpu_ms_per_image"] = round(1000 * cpu / max(images, 1), 2)
        if profile is not None:
            row.update(read_gil_profile(profile, profile_s, images_s))
        if "bare_forward_img_s" in result:
            row["vs_bare_forward"] = round(images_s / result["bare_forward_img_s"], 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result["load"] = rows
    result["load_after"] = os.getloadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--model")
    parser.add_argument("--data-dir", type=Path, help="the server's data dir, for the bare-model baseline")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--bare-seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--files-per-request", type=int, default=1)
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]: GRAFT_PREDICT_DEVICE of the "
                        "server this starts, and where the bare forward runs")
    parser.add_argument("--generator", choices=("wrk", "python"), help="default: wrk if installed")
    parser.add_argument("--gil-profile", action="store_true", help="also sample the API process with py-spy")
    args = parser.parse_args()
    if args.gil_profile and not shutil.which("py-spy"):
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    if args.generator == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    if args.url:
        model_id = args.model or train_model(args.url)
        print(json.dumps(measure(args.url, model_id, args.data_dir, args), indent=2))
        return
    # The server's capacity is measured, not the per-project rate limit (1,200 requests a minute by
    # default, which a few seconds of load exhaust: its 429s would count as errors and fast answers).
    env = {"GRAFT_PREDICT_DEVICE": args.device, "GRAFT_PREDICT_RATE_PER_MINUTE": "0"}
    with own_server(workers=1, env=env) as (url, data_dir):
        model_id = train_model(url)
        print(json.dumps(measure(url, model_id, Path(data_dir), args), indent=2))


if __name__ == "__main__":
    main()
