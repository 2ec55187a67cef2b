"""The training data path: decoded images cached for every later job, and batches kept on the device."""
from __future__ import annotations

import shutil

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.store.blobs import BlobStore
from service.store.db import Database
from tests.support.data import subset_zip
from tests.support.training import PRE, Recorder
from workers.config import TrainConfig
from workers.data import DecodedCache
from workers.decoded_cache import file_bytes
from workers.worker import load_training_data


@pytest.fixture
def uploaded(settings) -> str:
    with TestClient(create_app(settings)) as client:
        resp = client.post("/v1/datasets", files={"file": ("set.zip", subset_zip(6, 3), "application/zip")})
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]


def prepare(settings, dataset_id: str, cache: DecodedCache | None, pre=PRE):
    db = Database(settings.database_url)
    try:
        recorder = Recorder()
        data = load_training_data(db, BlobStore(settings.blobs_dir), dataset_id, TrainConfig(strategy="linear_probe"),
                            pre, recorder, cache)
        return data, [u for u in recorder.updates if u.get("phase") == "decoding images"]
    finally:
        db.dispose()


def test_second_job_reads_decoded_images_from_the_cache(settings, uploaded):
    first, decoded = prepare(settings, uploaded, DecodedCache(settings.decoded_cache_dir, 2**30))
    assert decoded, "the first job decodes"
    assert len(list(settings.decoded_cache_dir.glob("*.u8"))) == 1
    # A new worker (empty memory) on the same dataset: no decoding, even with the blobs gone.
    shutil.rmtree(settings.blobs_dir)
    again, decoded = prepare(settings, uploaded, DecodedCache(settings.decoded_cache_dir, 2**30))
    assert not decoded
    for a, b in ((first.train_x, again.train_x), (first.val_x, again.val_x), (first.train_y, again.train_y)):
        assert torch.equal(a, b)


def test_another_preprocessing_is_another_cache_entry(settings, uploaded):
    cache = DecodedCache(settings.decoded_cache_dir, 2**30)
    small, _ = prepare(settings, uploaded, cache)
    large, decoded = prepare(settings, uploaded, cache, pre=PRE.__class__(96, 110, PRE.mean, PRE.std, PRE.interpolation))
    assert decoded and large.train_x.shape[-1] == 110 and small.train_x.shape[-1] == PRE.resize_size


def test_damaged_cache_file_is_decoded_again(settings, uploaded):
    first, _ = prepare(settings, uploaded, DecodedCache(settings.decoded_cache_dir, 2**30))
    pixels = first.train_x.clone()
    del first  # unmapped: Graft never changes a cache file in place, so nothing reads one meanwhile
    (path,) = settings.decoded_cache_dir.glob("*.u8")
    path.write_bytes(b"not a cache file")
    again, decoded = prepare(settings, uploaded, DecodedCache(settings.decoded_cache_dir, 2**30))
    assert decoded and torch.equal(pixels, again.train_x)


def test_cache_keeps_to_its_disk_budget_evicting_the_oldest(tmp_path):
    one = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    cache = DecodedCache(tmp_path, max_bytes=2 * file_bytes(one.shape) + 400, memory_entries=1)  # room for two files
    for key in ("a", "b", "c"):
        cache.put(key, one)
    assert sorted(p.stem for p in tmp_path.glob("*.u8")) == ["b", "c"]
    assert cache.get("a") is None and torch.equal(cache.get("b"), one)


def test_order_of_images_is_part_of_the_key():
    assert DecodedCache.key(["x", "y"], PRE) != DecodedCache.key(["y", "x"], PRE)


def test_decoded_square_is_pillows_bicubic_resize_and_center_crop():
    """The fast uint8 resize gives what Pillow's antialiased bicubic gives (the documented
    preprocessing, and what an export's usage recipe does), for landscape, portrait and upscaled
    photos, within 2 levels: a transposed, shifted or unfiltered result differs by far more."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from tests.support.data import hymenoptera_files
    from workers.imaging import decode_image
    from workers.preprocessing import square_u8

    photos = [decode_image(p.read_bytes(), draft_size=PRE.resize_size)
              for p in hymenoptera_files("val", "ants")[:12] + hymenoptera_files("val", "bees")[:12]]
    photos += [photos[0].resize((90, 140)), photos[1].resize((300, 120))]  # upscaled: portrait, wide
    assert {img.width > img.height for img in photos} == {True, False}
    for img in photos:
        s = PRE.resize_size
        scale = s / min(img.size)
        size = (max(s, round(img.width * scale)), max(s, round(img.height * scale)))
        left, top = (size[0] - s) // 2, (size[1] - s) // 2
        pillow = F.pil_to_tensor(img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
                                 .crop((left, top, left + s, top + s)))
        ours = square_u8(F.pil_to_tensor(img), PRE)
        assert ours.shape == (3, s, s) and ours.dtype == torch.uint8
        assert (ours.int() - pillow.int()).abs().max() <= 2


def test_a_second_linear_probe_on_the_dataset_reuses_the_first_ones_features(settings, uploaded):
    """On a CPU worker, a later linear probe on the same dataset runs no backbone pass and says so;
    its head is fitted to the same features, so the same recipe scores the same."""
    from workers.training.probe import REUSED_FEATURES
    from workers.worker import Worker

    REUSED_FEATURES.clear()
    try:
        with TestClient(create_app(settings)) as client:
            recipes = [{"strategy": "linear_probe"}, {"strategy": "linear_probe", "learning_rate": 0.003},
                       {"strategy": "linear_probe"}]
            ids = [client.post("/v1/jobs", json={"dataset_id": uploaded, **r}).json()["id"] for r in recipes]
            Worker(settings.model_copy(update={"worker_device": "cpu"})).run(max_jobs=len(ids))  # reuse is CPU-only
            models = []
            for job_id in ids:
                job = client.get(f"/v1/jobs/{job_id}").json()
                assert job["status"] == "succeeded", job
                models.append(client.get(f"/v1/models/{job['model_id']}").json()["metrics"])
        first, other_rate, same = models
        assert first["features_reused"] is False and first["train_images_per_s"] > 0
        assert other_rate["features_reused"] is True and other_rate["train_images_per_s"] is None
        assert same["features_reused"] is True and same["val_accuracy"] == first["val_accuracy"]
        assert same["val_loss"] == first["val_loss"]
    finally:
        REUSED_FEATURES.clear()
