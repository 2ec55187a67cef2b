"""Big datasets on small machines (issue 22): a worker's memory is bounded by GRAFT_WORKER_MEMORY_MB,
not by the dataset. The decoded images live in one memory-mapped file per dataset version and
resolution; what a job reads of it beyond the budget is handed back to the page cache; the file
survives a restart, follows the images and the resolution, and is never read when incomplete."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.store.blobs import BlobStore
from service.store.db import Database
from service.store.tables import Dataset
from tests.support.data import REPO, hymenoptera_files, make_zip, subset_zip
from tests.support.training import PRE, SPEC, Recorder
from workers.config import TrainConfig
from workers.data import DecodedCache
from workers.decoded_cache import TMP_PREFIX, file_bytes, open_images
from workers.preprocessing import eval_crop
from workers.training.contract import NullControl
from workers.training.parts import features_of
from workers.worker import Worker, load_training_data

LINEAR_PROBE = TrainConfig(strategy="linear_probe", image_size=64)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def uploaded(client) -> str:
    """60 photos (40 train, 20 val): 0.96 MB decoded at 64 px, many times the budgets below."""
    resp = client.post("/v1/datasets", files={"file": ("set.zip", subset_zip(20, 10), "application/zip")})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def prepare(settings, dataset_id: str, cache: DecodedCache | None, pre=PRE, config=LINEAR_PROBE):
    """(PreparedData, whether it decoded any image)."""
    db = Database(settings.database_url)
    try:
        with db.session() as s:
            project_id = s.get(Dataset, dataset_id).project_id  # the owner a worker keys the cache by
        recorder = Recorder()
        data = load_training_data(db, BlobStore.for_settings(settings), dataset_id, config, pre, recorder, cache,
                                  project_id=project_id)
        return data, any(u.get("phase") == "decoding images" for u in recorder.updates)
    finally:
        db.dispose()


def mapped_rss(path: Path) -> int:
    """Bytes of `path`'s memory maps resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0]:  # a mapping's first line: its address range, its file
            inside = line.rstrip().endswith(str(path)) or line.rstrip().endswith(f"{path} (deleted)")
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_a_job_larger_than_the_memory_budget_succeeds_with_the_in_memory_paths_features(settings, client, uploaded):
    """A real worker on a 1 MiB budget trains a linear probe on the photos; its model scores exactly
    what the in-memory path's scores, the features are bit-identical, and after the job the worker
    holds no more of the mapped images than the budget's resident half."""
    small = settings.model_copy(update={"worker_memory_mb": 1, "worker_device": "cpu"})
    in_memory, _ = prepare(settings, uploaded, None)
    worker = Worker(small)
    job = client.post("/v1/jobs", json={"dataset_id": uploaded, "strategy": "linear_probe", "image_size": 64,
                                        "epochs": 3}).json()
    worker.run(max_jobs=1)
    job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", (job["status"], job.get("error"), job.get("attempt"))
    (path,) = small.decoded_cache_dir.glob("*.u8")
    assert path.stat().st_size == file_bytes((60, 3, PRE.resize_size, PRE.resize_size))
    worker.decoded.pager.release_beyond_budget()
    assert mapped_rss(path) <= worker.decoded.resident_bytes

    mapped, decoded = prepare(small, uploaded, worker.decoded)
    assert not decoded, "the job's file serves the next job"
    assert mapped.labeled_x().nbytes > worker.decoded.resident_bytes
    for a, b in ((mapped.train_x, in_memory.train_x), (mapped.val_x, in_memory.val_x),
                 (mapped.train_y, in_memory.train_y), (mapped.val_y, in_memory.val_y)):
        assert torch.equal(a, b)
    backbone = SPEC.build_features(pretrained=True)
    for mirrored in (False, True):
        got = features_of(backbone, eval_crop(mapped.labeled_x(), PRE), PRE, torch.device("cpu"), NullControl(),
                          mirrored=mirrored)
        want = features_of(backbone, eval_crop(in_memory.labeled_x(), PRE), PRE, torch.device("cpu"), NullControl(),
                           mirrored=mirrored)
        assert torch.equal(got, want)

    # The same job on the in-memory path (no cache file, a budget the images fit): the same model.
    roomy = settings.model_copy(update={"decoded_cache_mb": 0, "data_dir": settings.data_dir, "worker_device": "cpu"})
    again = client.post("/v1/jobs", json={"dataset_id": uploaded, "strategy": "linear_probe", "image_size": 64,
                                          "epochs": 3}).json()
    Worker(roomy).run(max_jobs=1)
    metrics = [client.get(f"/v1/models/{client.get(f'/v1/jobs/{j}').json()['model_id']}").json()["metrics"]
               for j in (job["id"], again["id"])]
    assert metrics[0]["val_loss"] == metrics[1]["val_loss"]
    assert metrics[0]["val_accuracy"] == metrics[1]["val_accuracy"]


def test_the_cache_survives_a_restart_and_follows_the_images_and_the_resolution(settings, client, uploaded):
    first, decoded = prepare(settings, uploaded, DecodedCache(settings.decoded_cache_dir, 2**30))
    assert decoded
    # A restarted worker (a new cache object, nothing in memory) with the photos gone: read from the file.
    for blob in list(settings.blobs_dir.rglob("*")):
        if blob.is_file():
            blob.rename(blob.with_name(blob.name + ".away"))
    restarted, decoded = prepare(settings, uploaded, DecodedCache(settings.decoded_cache_dir, 2**30))
    assert not decoded and torch.equal(first.train_x, restarted.train_x) and torch.equal(first.val_y, restarted.val_y)
    for blob in list(settings.blobs_dir.rglob("*.away")):
        blob.rename(blob.with_name(blob.name.removesuffix(".away")))

    # Graft's own split of the same photos: another seed is another layout of the same pixels,
    # copied from the first file, not decoded, and right.
    flat = make_zip({f"{p.parent.name}/{p.name}": p.read_bytes()
                     for label in ("ants", "bees") for p in hymenoptera_files("train", label)[:15]})
    unsplit = client.post("/v1/datasets", files={"file": ("flat.zip", flat, "application/zip")}).json()["id"]
    seed_0, decoded = prepare(settings, unsplit, DecodedCache(settings.decoded_cache_dir, 2**30))
    assert decoded
    other_seed = LINEAR_PROBE.model_copy(update={"seed": 7})
    seed_7, decoded = prepare(settings, unsplit, DecodedCache(settings.decoded_cache_dir, 2**30), config=other_seed)
    fresh, _ = prepare(settings, unsplit, None, config=other_seed)
    assert not decoded and not torch.equal(seed_7.val_x, seed_0.val_x)
    assert torch.equal(seed_7.train_x, fresh.train_x) and torch.equal(seed_7.val_x, fresh.val_x)

    # Another resolution, and the next version of the dataset: decoded again, into files of their own.
    larger = PRE.__class__(80, 91, PRE.mean, PRE.std, PRE.interpolation)
    at_80, decoded = prepare(settings, uploaded, DecodedCache(settings.decoded_cache_dir, 2**30), pre=larger)
    assert decoded and at_80.train_x.shape[-1] == 91
    client.post("/v1/jobs", json={"dataset_id": uploaded, "strategy": "linear_probe"})  # freezes this version
    photo = hymenoptera_files("train", "bees")[30]
    resp = client.post(f"/v1/datasets/{uploaded}/images", data={"label": "bees", "split": "train"},
                       files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert resp.status_code == 200, resp.text
    version_2 = resp.json()
    assert version_2["version"] == 2 and version_2["id"] != uploaded
    second, decoded = prepare(settings, version_2["id"], DecodedCache(settings.decoded_cache_dir, 2**30))
    assert decoded and len(second.train_x) == len(first.train_x) + 1
    assert len(list(settings.decoded_cache_dir.glob("*.u8"))) == 5  # v1, v1 at 80 px, v2; the flat set twice


def test_a_truncated_or_damaged_cache_file_is_rebuilt_never_read_as_pixels(settings, uploaded):
    cache_dir = settings.decoded_cache_dir
    first, _ = prepare(settings, uploaded, DecodedCache(cache_dir, 2**30))
    pixels = first.train_x.clone()
    del first  # unmapped (Graft itself never changes a cache file in place)
    (path,) = cache_dir.glob("*.u8")
    size = path.stat().st_size
    for damage in ("truncate", "no end marker"):
        with open(path, "r+b") as f:
            if damage == "truncate":
                f.truncate(size // 2)
            else:
                f.seek(size - 8)
                f.write(b"\0" * 8)
        assert open_images(path) is None and not path.exists()
        again, decoded = prepare(settings, uploaded, DecodedCache(cache_dir, 2**30))
        assert decoded and torch.equal(pixels, again.train_x)
        assert path.stat().st_size == size
        del again


WRITER = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import torch
    from workers.decoded_cache import DecodedCache

    def batches():  # the first two batches are written, then decoding hangs: the worker is killed there
        images = torch.arange(40 * 3 * 16 * 16).remainder(251).to(torch.uint8).view(40, 3, 16, 16)
        yield images[:8]
        yield images[8:16]
        print("stalled", flush=True)
        threading.Event().wait()

    DecodedCache(Path(sys.argv[2]), 2**30).build("entry", (40, 3, 16, 16), batches)
""")


def test_a_worker_killed_while_writing_the_cache_leaves_nothing_that_is_read(tmp_path):
    """SIGKILL a process in the middle of writing a cache entry: no entry appears (the next job
    decodes), and the dead writer's temporary file is swept when the next entry is written."""
    cache_dir = tmp_path / "decoded"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), str(cache_dir)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "stalled"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (partial,) = cache_dir.glob(f"{TMP_PREFIX}*")
    assert partial.stat().st_size > 4096, "the writer was killed with batches written"
    cache = DecodedCache(cache_dir, 2**30)
    assert cache.get("entry") is None and not list(cache_dir.glob("*.u8"))
    images = torch.arange(40 * 3 * 16 * 16).remainder(251).to(torch.uint8).view(40, 3, 16, 16)
    assert torch.equal(cache.put("entry", images), images)
    assert not partial.exists(), "the dead writer's temporary file is swept"
    assert torch.equal(DecodedCache(cache_dir, 2**30).get("entry"), images)


def test_entries_over_the_disk_budget_stay_in_memory_or_in_a_scratch_file(tmp_path):
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    fits = DecodedCache(tmp_path / "a", max_bytes=0, memory_bytes=1 << 20)
    assert torch.equal(fits.put("x", images), images) and not (tmp_path / "a").exists()
    tight = DecodedCache(tmp_path / "b", max_bytes=0, memory_bytes=16 << 10)
    scratch = tight.put("x", images)
    assert torch.equal(scratch, images)
    assert list((tmp_path / "b").iterdir()) == [], "the scratch file is deleted once mapped"
    assert tight.get("x") is not None  # its job keeps it while it runs


def test_dataset_listings_at_20000_images_are_paginated_with_a_fixed_number_of_queries(settings):
    """The listing endpoints on a dataset of 20,000 images (rows written directly: what an upload
    of that size leaves) answer one page with as many SQL statements as on a dataset of 60."""
    quiet = settings.model_copy(update={"webhook_dispatcher_in_api": False, "reaper_in_api": False})
    with TestClient(create_app(quiet)) as client:  # no background thread's statements in the count
        resp = client.post("/v1/datasets", files={"file": ("set.zip", subset_zip(20, 10), "application/zip")})
        assert resp.status_code == 201, resp.text
        _count_listing_statements(settings, client, resp.json()["id"])


def _count_listing_statements(settings, client, uploaded) -> None:
    from sqlalchemy import event, insert
    from sqlalchemy.engine import Engine

    from service.store.tables import DatasetImage

    def statements(path: str, **params) -> tuple[int, list]:
        seen = []

        def count(conn, cursor, statement, *args):
            seen.append(statement)
        event.listen(Engine, "before_cursor_execute", count)
        try:
            resp = client.get(path, params=params)
        finally:
            event.remove(Engine, "before_cursor_execute", count)
        assert resp.status_code == 200, resp.text
        return len(seen), resp.json()

    paths = [(f"/v1/datasets/{uploaded}/images", {"limit": 1000, "offset": 0}), (f"/v1/datasets/{uploaded}", {}),
             (f"/v1/datasets/{uploaded}/report", {}), ("/v1/datasets", {})]
    for path, params in paths:  # first requests: connections opened, the open server's project found
        statements(path, **params)
    small = [statements(path, **params)[0] for path, params in paths]
    db = Database(settings.database_url)
    try:
        with db.session() as s:
            s.execute(insert(DatasetImage), [
                {"dataset_id": uploaded, "sha256": f"{i:064x}", "label": ("ants", "bees")[i % 2], "split": "train",
                 "original_name": f"big/{i}.jpg", "width": 400, "height": 300, "mode": "RGB", "format": "JPEG",
                 "phash": f"{i * 2654435761 % 2**64:016x}", "size_bytes": 1000} for i in range(20_000 - 60)])
    finally:
        db.dispose()
    large = [statements(path, **params)[0] for path, params in paths]
    assert large == small and max(large) <= 6, (small, large)
    n, last_page = statements(f"/v1/datasets/{uploaded}/images", limit=1000, offset=19_500)
    assert n == small[0] and len(last_page) == 500 and last_page[-1]["id"] == f"{20_000 - 61:064x}"


def test_cached_activations_past_the_budget_live_in_a_scratch_file_with_the_same_values(tmp_path):
    """fine_tune_top's activation cache over the worker's budget is a mapped scratch file (deleted
    once mapped), and holds exactly what the in-memory cache holds."""
    from tests.support.training import tiny_data
    from workers.decoded_cache import SCRATCH
    from workers.training.top import StageActivations

    data = tiny_data(6, 3)
    features = SPEC.build_features(pretrained=True)
    compute = lambda: StageActivations.compute(features, SPEC, data.labeled_x(), PRE, 2, torch.device("cpu"),  # noqa: E731
                                               NullControl())
    in_memory = compute()
    saved = SCRATCH.max_bytes, SCRATCH.root
    SCRATCH.configure(1024, tmp_path)
    try:
        spilled = compute()
    finally:
        SCRATCH.configure(*saved)
    assert spilled.acts.untyped_storage().data_ptr() != in_memory.acts.untyped_storage().data_ptr()
    assert list(tmp_path.iterdir()) == [], "the scratch files are deleted once mapped"
    assert any(str(tmp_path) in line for line in Path("/proc/self/maps").read_text().splitlines())
    assert spilled.acts.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(spilled.acts, in_memory.acts) and torch.equal(spilled.acts_mirror, in_memory.acts_mirror)
