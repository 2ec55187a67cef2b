"""Batch prediction throughput: a batch job over N images against the bare inference engine.

    python bench/batch_predict.py                       # 2,000 images, CPU (or the GPU if there is one)
    python bench/batch_predict.py --images 10000 --device cuda --json out.json

In one process, on a fresh data dir (SQLite): trains a linear probe (224 px) on hymenoptera through
the API and a worker, makes a dataset of N images (the set's photos, repeated), then measures
1. the engine (before and after the job): the serving path alone (service.serving.model_cache.predict on an InferenceEngine
   built from the same Settings as the API's), images already in memory, as many chunks in flight
   as the batch worker keeps (warm: the backbone is traced before the clock starts);
2. the batch job: POST /v1/models/{id}/batch-predictions, a Worker claims and runs it; rate =
   N / (finished_at - started_at) of the job, so it includes loading the model, preparing the
   engine, reading every blob, writing results.csv and results.jsonl and checkpointing.
Target: the job at >= 85% of the engine's images/s (the better of its two runs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.e2e import DEFAULT_DATASET, train_once, zip_folder  # noqa: E402

TARGET = 0.85


def make_batch_dataset(settings, source_id: str, n: int) -> str:
    """A dataset of n images: the source dataset's, repeated in order (the blobs are shared)."""
    from sqlalchemy import select

    from service.store.db import Database
    from service.store.tables import Dataset, DatasetImage

    db = Database(settings.database_url)
    with db.session() as s:
        rows = s.scalars(select(DatasetImage).where(DatasetImage.dataset_id == source_id)
                         .order_by(DatasetImage.id)).all()
        dataset = Dataset(name=f"bench-{n}", classes=[""], class_counts={"": n}, split_counts={}, num_images=n,
                          has_val_split=False, rejected=[], trainable=False, frozen=True)
        s.add(dataset)
        s.flush()
        s.add_all(DatasetImage(dataset_id=dataset.id, sha256=r.sha256, label="", split=None,
                               original_name=f"{i:06d}-{r.original_name}", width=r.width, height=r.height,
                               mode=r.mode, format=r.format, phash=r.phash, size_bytes=r.size_bytes)
                  for i, r in zip(range(n), (rows * (n // len(rows) + 1))))
        dataset_id = dataset.id
    db.dispose()
    return dataset_id


def engine_rate(settings, model_row, files: list[tuple[str, bytes]]) -> tuple[float, int]:
    """engine_rate_here on a thread of its own, as the worker runs a job (torch sizes each thread's
    OpenMP team the first time the thread uses it, from the process default of that moment)."""
    answer = []
    thread = threading.Thread(target=lambda: answer.append(engine_rate_here(settings, model_row, files)))
    thread.start()
    thread.join()
    return answer[0]


def engine_rate_here(settings, model_row, files: list[tuple[str, bytes]]) -> tuple[float, int]:
    """Images/s of the serving path alone, as many chunks in flight as the batch worker keeps."""
    from service.serving.engine import InferenceEngine
    from service.serving.model_cache import predict
    from workers.artifacts import load_artifact
    from workers.batch_predict import step_size

    model = load_artifact(settings.data_path(model_row["artifact_dir"]), model_row["sha256"])
    engine = InferenceEngine(settings.predict_device, settings.predict_max_batch, settings.predict_batch_window_ms,
                             settings.torch_threads, parallel=settings.predict_parallel).start()
    step = step_size(settings, engine)
    try:
        predict(engine, model, files[:step], 5)  # trace and freeze before the clock starts
        chunks = [files[i:i + step] for i in range(0, len(files), step)]
        started = time.perf_counter()
        with ThreadPoolExecutor(engine.parallel + 1) as pool:
            list(pool.map(lambda chunk: predict(engine, model, chunk, 5), chunks))
        return len(files) / (time.perf_counter() - started), step
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--device", default="auto", help="GRAFT_PREDICT_DEVICE and GRAFT_WORKER_DEVICE")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.update(GRAFT_PREDICT_DEVICE=args.device, GRAFT_WORKER_DEVICE=args.device)

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from service.store.blobs import BlobStore
    from service.store.migrate import upgrade
    from workers.worker import Worker

    data_dir = Path(tempfile.mkdtemp(prefix="graft-bench-batch-"))
    settings = Settings(data_dir=data_dir, heartbeat_interval_s=1.0, poll_interval_s=0.05,
                        predict_rate_per_minute=0, upload_rate_per_minute=0)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    worker = Worker(settings)
    thread = threading.Thread(target=worker.run, daemon=True)
    with TestClient(create_app(settings)) as client:
        thread.start()
        source = client.post("/v1/datasets", files={"file": ("set.zip", zip_folder(args.dataset))}).json()
        job, train_s = train_once(client, source["id"], "linear_probe", {})
        model = client.get(f"/v1/models/{job['model_id']}").json()
        from service.store.db import Database
        from service.store.tables import Model
        db = Database(settings.database_url)
        with db.session() as s:
            row = s.get(Model, model["id"])
            model_row = {"artifact_dir": row.artifact_dir, "sha256": row.sha256}
        db.dispose()
        dataset_id = make_batch_dataset(settings, source["id"], args.images)
        blobs = BlobStore(settings.blobs_dir)
        images = client.get(f"/v1/datasets/{source['id']}/images", params={"limit": 1000}).json()
        originals = [(i["original_name"], blobs.read(i["id"])) for i in images]
        files = [originals[n % len(originals)] for n in range(args.images)]

        bare, step = engine_rate(settings, model_row, files)

        posted = time.perf_counter()
        batch = client.post(f"/v1/models/{model['id']}/batch-predictions", json={"dataset_id": dataset_id}).json()
        while batch["status"] in ("queued", "running"):
            time.sleep(0.05)
            batch = client.get(f"/v1/batch-predictions/{batch['id']}").json()
        wall = time.perf_counter() - posted
        bare_after, _ = engine_rate(settings, model_row, files)  # the same again: how noisy the machine is
        worker.request_shutdown()
    if batch["status"] != "succeeded":
        raise SystemExit(f"the batch prediction ended {batch['status']}: {batch.get('error')}")
    run_s = (datetime.fromisoformat(batch["finished_at"]) - datetime.fromisoformat(batch["started_at"])).total_seconds()
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": str(worker.device), "images": args.images, "step": step, "train_s": round(train_s, 1),
        "engine_images_per_s": round(bare, 1), "engine_after_images_per_s": round(bare_after, 1),
        "job_images_per_s": round(args.images / run_s, 1),
        "job_s": round(run_s, 2), "post_to_done_s": round(wall, 2),
        "ratio": round(args.images / run_s / max(bare, bare_after), 3), "target": TARGET,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
