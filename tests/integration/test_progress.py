"""A running job shows what it is doing: a real job through the API reports every phase in the one
progress shape (workers/progress.py), in order, with totals that are the dataset's own counts, both
as its events (what SSE clients get) and as its progress."""
from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from service.app import create_app
from tests.support.data import hymenoptera_files, make_zip
from workers.progress import EVENT_TENTHS
from workers.worker import Worker

TRAIN, VAL, TEST = 6, 3, 2  # per class


def three_splits() -> bytes:
    """train/, val/ and test/ folders of hymenoptera photos (the test ones from its val split)."""
    entries = {}
    for label in ("ants", "bees"):
        train, val = hymenoptera_files("train", label), hymenoptera_files("val", label)
        for split, photos in (("train", train[:TRAIN]), ("val", val[:VAL]), ("test", val[VAL:VAL + TEST])):
            entries.update({f"{split}/{label}/{p.name}": p.read_bytes() for p in photos})
    return make_zip(entries)


def test_a_jobs_events_carry_every_phase_in_order_with_the_datasets_counts(settings):
    epochs = 4
    with TestClient(create_app(settings)) as client:
        dataset = client.post("/v1/datasets", files={"file": ("bugs.zip", three_splits())}).json()
        assert dataset["split_counts"]["test"] == {"ants": TEST, "bees": TEST}
        job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "strategy": "linear_probe", "image_size": 64,
                                            "epochs": epochs, "augmentation": "light", "tta_flip": True}).json()
        worker = threading.Thread(target=Worker(settings).run, kwargs={"max_jobs": 1}, daemon=True)
        worker.start()
        worker.join(240)
        job = client.get(f"/v1/jobs/{job['id']}").json()
        assert job["status"] == "succeeded", job
        events = client.get(f"/v1/jobs/{job['id']}/events").json()

    train, val, test = 2 * TRAIN, 2 * VAL, 2 * TEST
    expected = {  # phase: (unit, total)
        "decoding images": ("images", train + val + test),  # every image, once
        "extracting features": ("images", 2 * (train + val)),  # each with its mirror (light, tta_flip)
        "training": ("epochs", epochs),
        "scoring the test split": ("images", test),
    }
    progress = [e["data"] for e in events if e["kind"] == "progress"]
    order = list(dict.fromkeys(p["phase"] for p in progress))
    assert order == list(expected), order
    kinds = [e["kind"] for e in events]
    assert kinds.index("progress") > kinds.index("status")  # after "running"
    for phase, (unit, total) in expected.items():
        mine = [p for p in progress if p["phase"] == phase]
        assert {(p["unit"], p["total"]) for p in mine} == {(unit, total)}, mine
        assert mine[0]["done"] == 0 and mine[-1]["done"] == total, mine  # from its start to its end
        assert [p["done"] for p in mine] == sorted(p["done"] for p in mine)
        assert len(mine) <= EVENT_TENTHS + 2  # bounded, however long the loop
        assert all({"rate", "eta_s", "elapsed_s", "backbone"} <= set(p) for p in mine)
        assert mine[-1]["backbone"] == "efficientnet_lite0"
    # Each phase's events come before the next phase's: a phase is one stretch of the job here.
    assert [p["phase"] for p in progress] == sorted((p["phase"] for p in progress), key=list(expected).index)
    assert [e["data"]["epoch"] for e in events if e["kind"] == "epoch"] == list(range(1, epochs + 1))
    assert events[-1]["kind"] == "status" and events[-1]["data"]["status"] == "succeeded"

    # The job's own progress ends with the same phases, each counted to its total.
    final = job["progress"]
    assert [(p["phase"], p["unit"], p["done"], p["total"]) for p in final["phases"]] == [
        (phase, unit, total, total) for phase, (unit, total) in expected.items()]
    assert all(p["seconds"] >= 0 for p in final["phases"])
    assert final["phase"] == "scoring the test split" and final["done"] == final["total"] == test
