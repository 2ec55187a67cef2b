"""The default job through a real worker: auto may choose another EfficientNet-Lite, and the model
it publishes is that backbone's network with that backbone's preprocessing."""
from __future__ import annotations

import json

from fastapi.testclient import TestClient

from service.app import create_app
from tests.support.data import hymenoptera_files, subset_zip
from tests.support.ingest import upload
from workers.backbones import AUTO_BACKBONES, get_backbone
from workers.worker import Worker


def test_the_default_job_chooses_among_the_lites_and_serves_the_one_it_chose(settings):
    settings.torch_threads = 1
    settings.heartbeat_interval_s = 5.0  # three backbones' weights load in this job: a long one for a test
    with TestClient(create_app(settings)) as client:
        dataset = upload(client, subset_zip(6, 0)).json()  # no val/ split: auto cross-validates
        job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "image_size": 64, "time_budget_s": 120})
        assert job.status_code == 202 and job.json()["config"]["backbone"] is None
        Worker(settings).run(max_jobs=1)
        done = client.get(f"/v1/jobs/{job.json()['id']}").json()
        assert done["status"] == "succeeded", done
        model = client.get(f"/v1/models/{done['model_id']}").json()
        chosen = model["recipe"]["backbone"]
        assert model["backbone"] == chosen and model["metrics"]["auto"]["chosen"]["backbone"] == chosen
        tried = {c["recipe"]["backbone"] for c in model["metrics"]["auto"]["candidates"]}
        assert tried == set(AUTO_BACKBONES)  # the budget had room for every Lite's heads
        # The artifact is that backbone's, with its preprocessing at the job's size, which predict uses.
        manifest = json.loads((settings.models_dir / model["id"] / "manifest.json").read_text())
        assert manifest["backbone"] == chosen
        assert manifest["preprocessing"] == get_backbone(chosen).preprocessing.at_size(64).to_dict()
        photos = [p for label in ("ants", "bees") for p in hymenoptera_files("val", label)[:2]]
        resp = client.post(f"/v1/models/{model['id']}/predict",
                           files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in photos])
        assert resp.status_code == 200, resp.text
        assert [r["predictions"][0]["label"] in ("ants", "bees") for r in resp.json()["results"]] == [True] * 4
