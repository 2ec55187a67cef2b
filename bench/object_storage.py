"""What object storage costs end to end: the linear probe of bench/e2e.py (upload the full
hymenoptera set, submit, wait for the model) with every file in the data dir (the default) against
every file in an S3 server (SeaweedFS `weed mini` on loopback, tests/support/s3.py), alternating.

    python bench/object_storage.py              # 3 pairs
    python bench/object_storage.py --pairs 5
    python bench/object_storage.py --parts      # the storage steps alone, in-process

In the S3 runs the worker is another "machine": its own data dir (cache) and nothing shared with
the API but the database (a SQLite file here) and the bucket, so it downloads every image and the
API downloads the model. In the local runs API and worker share the data dir, as `graft serve` does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.e2e import DEFAULT_DATASET, own_server, run  # noqa: E402
from tests.support.s3 import BUCKET, WeedServer, s3_env  # noqa: E402


def worker(data_dir: Path, database_url: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], cwd=REPO,
                            env={**os.environ, **env, "GRAFT_DATA_DIR": str(data_dir), "GRAFT_DATABASE_URL": database_url},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def one_run(mode: str, dataset: Path, weed: WeedServer) -> dict:
    env = {}
    if mode == "s3":
        env = {"GRAFT_STORAGE_URL": f"s3://{BUCKET}/bench-{uuid.uuid4().hex[:8]}", **s3_env(weed.endpoint)}
    with own_server(workers=0, env=env) as (url, data_dir):
        database_url = f"sqlite:///{(data_dir / 'graft.db').resolve()}"
        worker_dir = Path(tempfile.mkdtemp(prefix="graft-bench-worker-")) if mode == "s3" else data_dir
        proc = worker(worker_dir, database_url, env)
        try:
            deadline = time.monotonic() + 180
            while not httpx.get(url + "/v1/workers").json():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the worker did not register")
                time.sleep(0.2)
            result = run(url, dataset, "linear_probe", {}, latency_requests=10)
        finally:
            proc.terminate()
            proc.wait(60)
    return {"mode": mode, "upload_s": result["upload_s"], "submit_to_ready_s": result["submit_to_ready_s"],
            "val_accuracy_from_predict": result["val_accuracy_from_predict"],
            "load": round(os.getloadavg()[0], 2)}


def parts(dataset: Path, weed: WeedServer) -> dict:
    """The storage steps of that job alone, in this process: the upload's commit (parallel PUTs of
    every image), a cold worker cache reading every image (parallel GETs, sha256 checked), and a
    model's two files up and down."""
    from service.settings import Settings
    from service.store.blobs import BlobStore
    from service.store.objects import store_for

    os.environ.update(s3_env(weed.endpoint))
    tmp = Path(tempfile.mkdtemp(prefix="graft-bench-parts-"))
    url = f"s3://{BUCKET}/parts-{uuid.uuid4().hex[:8]}"
    api, worker_ = (Settings(data_dir=tmp / name, storage_url=url) for name in ("api", "worker"))
    for s in (api, worker_):
        s.ensure_dirs()
    files = [p.read_bytes() for p in sorted(dataset.rglob("*.jpg"))]
    blobs = BlobStore.for_settings(api)
    with blobs.staging(api.tmp_dir) as stage:
        shas = [stage.put(data) for data in files]
        t = time.perf_counter()
        stage.commit(shas)
        commit_s = time.perf_counter() - t
    cold = BlobStore.for_settings(worker_)
    read = cold.reader(shas)
    t = time.perf_counter()
    for sha in shas:
        read(sha)
    read_s = time.perf_counter() - t
    model = api.models_dir / "m"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(os.urandom(5 * 2**10))  # a linear probe's head: a few KB
    (model / "manifest.json").write_bytes(b"{}" * 2000)
    t = time.perf_counter()
    store_for(api).commit_tree("models/m")
    up_s = time.perf_counter() - t
    t = time.perf_counter()
    store_for(worker_).fetch_files("models/m", ("model.safetensors", "manifest.json"))
    down_s = time.perf_counter() - t
    return {"images": len(files), "megabytes": round(sum(map(len, files)) / 2**20, 1),
            "upload_commit_s": round(commit_s, 3), "cold_read_all_s": round(read_s, 3),
            "model_upload_s": round(up_s, 3), "model_download_s": round(down_s, 3),
            "load": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--parts", action="store_true", help="only time the storage steps, in-process")
    args = parser.parse_args()
    weed = WeedServer().start()
    try:
        if args.parts:
            print(json.dumps([parts(args.dataset, weed) for _ in range(3)], indent=2))
            return
        runs = [one_run(mode, args.dataset, weed) for _ in range(args.pairs) for mode in ("local", "s3")]
    finally:
        weed.close()
    median = {mode: {key: statistics.median(r[key] for r in runs if r["mode"] == mode)
                     for key in ("upload_s", "submit_to_ready_s")} for mode in ("local", "s3")}
    print(json.dumps({"runs": runs, "median": median,
                      "s3_over_local_submit_to_ready": round(median["s3"]["submit_to_ready_s"]
                                                             / median["local"]["submit_to_ready_s"], 3),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores"}, indent=2))


if __name__ == "__main__":
    main()
