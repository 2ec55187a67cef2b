"""Unlabeled images (issue 16) through the API: every way in, what the report says of them, labeling
them (one or many, with a new version once a job used the dataset), the refusals, and the
suggestions of a model a real worker trained (32 px noise pictures: seconds)."""
from __future__ import annotations


import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.auth import create_key, create_project
from service.app import create_app
from service.datasets.report import NEAR_DUPLICATE_BITS
from service.store.db import Database
from tests.support.ingest import assert_problem, class_folders, encode, make_zip, noise, png, upload
from workers.worker import Worker

TINY_JOB = {"strategy": "linear_probe", "image_size": 32, "epochs": 1}


def images(client, dataset_id: str, **params) -> list[dict]:
    resp = client.get(f"/v1/datasets/{dataset_id}/images", params={"limit": 1000, **params})
    assert resp.status_code == 200, resp.text
    return resp.json()


def recompressed(seed: int, quality: int) -> bytes:
    """The same picture re-encoded: another file, a near-identical perceptual hash."""
    img = noise(seed, size=(48, 48)).resize((96, 96), Image.Resampling.BICUBIC)
    return encode(img, "JPEG", quality=quality)


@pytest.fixture
def client(settings):
    settings.torch_threads = 1
    with TestClient(create_app(settings)) as c:
        yield c


def theirs(settings) -> dict:
    db = Database(settings.database_url)
    with db.session() as s:
        _, key = create_key(s, create_project(s, "other-team").id, "k", "admin")
    db.dispose()
    return {"Authorization": f"Bearer {key}"}


def test_unlabeled_images_come_in_three_ways_and_count_toward_no_class(client):
    entries = class_folders({"ants": 5, "bees": 5})
    entries |= {f"unlabeled/u{i}.png": png(100 + i) for i in range(4)}
    entries["unlabeled/more/deep.png"] = png(120)
    entries["unlabeled/copy.png"] = entries["ants/img0.png"]  # an unlabeled copy of a labeled image
    resp = upload(client, make_zip(entries))
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    report = ds["report"]
    assert ds["classes"] == ["ants", "bees"] and ds["class_counts"] == {"ants": 5, "bees": 5}
    assert report["unlabeled_count"] == 5 and report["num_labeled"] == 10 and report["num_images"] == 15
    assert report["trainable"]
    assert any("copy.png" in r["path"] and "labeled 'ants'" in r["reason"] for r in report["rejected"])
    unlabeled = images(client, ds["id"], unlabeled=True)
    assert len(unlabeled) == 5 and all(i["label"] is None and i["split"] is None for i in unlabeled)
    assert len(images(client, ds["id"], unlabeled=False)) == 10

    # a manifest row with an empty label, and a JSONL row without one
    csv = "path,label\na.png,ants\nb.png,ants\nc.png,bees\nd.png,bees\ne.png,\nf.png,  \n"
    manifest = make_zip({"labels.csv": csv.encode(), **{f"{n}.png": png(200 + i) for i, n in enumerate("abcdef")}})
    counts = upload(client, manifest).json()["report"]
    assert counts["unlabeled_count"] == 2 and counts["class_counts"] == {"ants": 2, "bees": 2}
    jsonl = '{"path": "a.png", "label": "ants"}\n{"path": "b.png"}\n{"path": "c.png", "label": ""}\n'
    counts = upload(client, make_zip({"labels.jsonl": jsonl.encode(), "a.png": png(300), "b.png": png(301),
                                      "c.png": png(302)})).json()["report"]
    assert counts["unlabeled_count"] == 2 and counts["class_counts"] == {"ants": 1}

    # POST without a label
    added = client.post(f"/v1/datasets/{ds['id']}/images", files=[("file", ("x.png", png(400), "image/png")),
                                                                   ("file", ("y.png", png(401), "image/png"))])
    assert added.status_code == 200, added.text
    assert added.json()["report"]["unlabeled_count"] == 7 and added.json()["class_counts"] == {"ants": 5, "bees": 5}


def test_the_report_checks_unlabeled_images_and_an_unlabeled_only_dataset_cannot_train(client):
    labeled = recompressed(7, 95)
    entries = {**class_folders({"ants": 5, "bees": 5}), "ants/photo.jpg": labeled,
               "unlabeled/again.jpg": recompressed(7, 60), "unlabeled/broken.jpg": labeled[:80]}
    report = upload(client, make_zip(entries)).json()["report"]
    assert report["unlabeled_near_duplicate_count"] == 1
    pair = report["unlabeled_near_duplicates"][0]
    assert pair["a"]["label"] == "ants" and pair["b"]["label"] is None and pair["distance"] <= NEAR_DUPLICATE_BITS
    assert any("broken.jpg" in r["path"] for r in report["rejected"])
    assert any("unlabeled" in w for w in report["warnings"])

    only = upload(client, make_zip({f"unlabeled/u{i}.png": png(500 + i) for i in range(6)})).json()
    assert not only["trainable"] and only["report"]["unlabeled_count"] == 6
    assert_problem(client.post("/v1/jobs", json={"dataset_id": only["id"], **TINY_JOB}), 422,
                   "6 image(s) are unlabeled", "label at least")


def test_labeling_one_or_many_images_and_the_refusals(client, settings):
    entries = {**class_folders({"ants": 5, "bees": 5}), **{f"unlabeled/u{i}.png": png(600 + i) for i in range(5)}}
    ds = upload(client, make_zip(entries)).json()
    ids = [i["id"] for i in images(client, ds["id"], unlabeled=True)]

    one = client.patch(f"/v1/datasets/{ds['id']}/images/{ids[0]}", json={"label": "ants"})
    assert one.status_code == 200, one.text
    assert one.json()["id"] == ds["id"] and one.json()["version"] == 1  # no job used it: changed in place
    assert one.json()["class_counts"] == {"ants": 6, "bees": 5} and one.json()["report"]["unlabeled_count"] == 4

    # not a class: 422 listing the classes; create_class adds it
    body = assert_problem(client.patch(f"/v1/datasets/{ds['id']}/images/{ids[1]}", json={"label": "wasps"}), 422,
                          "'wasps' is not a class", "'ants', 'bees'", "create_class")
    assert body["classes"] == ["ants", "bees"]
    assert_problem(client.patch(f"/v1/datasets/{ds['id']}/images/{ids[1]}", json={"label": "Ants",
                                                                                     "create_class": True}),
                   422, "letter case")
    assert client.get(f"/v1/datasets/{ds['id']}").json()["classes"] == ["ants", "bees"]  # refused: nothing changed

    # a job freezes the dataset: labeling then makes version 2, in one change for a batch
    assert client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB}).status_code == 202
    batch = client.patch(f"/v1/datasets/{ds['id']}/images", json={"create_class": True, "images": [
        {"id": ids[2], "label": "bees"}, {"id": ids[3], "label": "bees"}, {"id": ids[0], "label": None},
        {"id": ids[1], "label": "wasps"}]})
    assert batch.status_code == 200, batch.text
    v2 = batch.json()
    assert v2["version"] == 2 and v2["previous_version_id"] == ds["id"]
    assert v2["class_counts"] == {"ants": 5, "bees": 7, "wasps": 1} and v2["report"]["unlabeled_count"] == 2
    assert v2["classes"] == ["ants", "bees", "wasps"]
    assert client.get(f"/v1/datasets/{ds['id']}").json()["class_counts"] == {"ants": 6, "bees": 5}  # v1 as it was
    assert_problem(client.patch(f"/v1/datasets/{ds['id']}/images/{ids[4]}", json={"label": "ants"}), 409,
                   "newer version")

    # unknown images: 404, and nothing changes (one bad id refuses the whole batch)
    assert_problem(client.patch(f"/v1/datasets/{v2['id']}/images/{'0' * 64}", json={"label": "ants"}), 404,
                   "no image")
    assert_problem(client.patch(f"/v1/datasets/{v2['id']}/images", json={"images": [
        {"id": ids[4], "label": "ants"}, {"id": "nope", "label": "ants"}]}), 404, "no image")
    assert client.get(f"/v1/datasets/{v2['id']}").json()["report"]["unlabeled_count"] == 2
    assert client.patch(f"/v1/datasets/{v2['id']}/images", json={"images": []}).status_code == 422

    # another project's dataset and images: 404, as if they did not exist
    other = theirs(settings)
    assert_problem(client.patch(f"/v1/datasets/{v2['id']}/images/{ids[4]}", json={"label": "ants"}, headers=other),
                   404, "no dataset")
    assert_problem(client.patch(f"/v1/datasets/{v2['id']}/images", json={"images": [{"id": ids[4], "label": "ants"}]},
                                headers=other), 404, "no dataset")
    assert_problem(client.get(f"/v1/datasets/{v2['id']}/images", params={"unlabeled": True}, headers=other), 404)


@pytest.fixture
def trained(settings, client):
    """A tiny linear probe, and its dataset with unlabeled images: 12 distinct pictures and five
    near-copies of one more."""
    entries = {**class_folders({"ants": 5, "bees": 5}), **{f"unlabeled/u{i}.png": png(700 + i) for i in range(12)}}
    entries |= {f"unlabeled/copy{q}.jpg": recompressed(9, q) for q in (95, 85, 75, 65, 55)}
    ds = upload(client, make_zip(entries)).json()
    assert ds["report"]["unlabeled_count"] == 17
    job = client.post("/v1/jobs", json={"dataset_id": ds["id"], **TINY_JOB}).json()
    Worker(settings).run(max_jobs=1)
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done
    return ds, done["model_id"], entries


def test_suggestions_rank_the_unlabeled_images_with_pre_labels(client, settings, trained):
    ds, model_id, entries = trained
    unlabeled = {i["id"]: i for i in images(client, ds["id"], unlabeled=True)}
    for strategy in ("margin", "entropy", "diverse"):
        resp = client.get(f"/v1/models/{model_id}/suggestions", params={"dataset_id": ds["id"], "k": 8,
                                                                         "strategy": strategy})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["unlabeled_images"] == body["scored_images"] == 17 and body["strategy"] == strategy
        rows = body["suggestions"]
        assert [r["rank"] for r in rows] == list(range(1, 9))
        assert len({r["image_id"] for r in rows}) == 8 and {r["image_id"] for r in rows} <= set(unlabeled)
        for r in rows:
            assert r["predicted_label"] in ("ants", "bees") and r["predicted_label"] == r["predictions"][0]["label"]
            assert r["margin"] == pytest.approx(r["predictions"][0]["score"] - r["predictions"][1]["score"], abs=1e-5)
            assert r["thumbnail"] == f"/v1/datasets/{ds['id']}/images/{r['image_id']}/thumbnail"
        if strategy == "margin":
            assert [r["margin"] for r in rows] == sorted(r["margin"] for r in rows)
        if strategy == "entropy":
            assert [r["entropy"] for r in rows] == sorted((r["entropy"] for r in rows), reverse=True)
        if strategy == "diverse":  # at most one of the five near-copies: 12 other pictures remain
            copies = [r for r in rows if r["original_name"].startswith("unlabeled/copy")]
            assert len(copies) <= 1
    # the pre-label is what /predict says of the image
    first = rows[0]
    predicted = client.post(f"/v1/models/{model_id}/predict", files={"file": (
        "x", entries[first["original_name"]], "image/png")}).json()["results"][0]["predictions"][0]
    assert predicted["label"] == first["predicted_label"]
    assert predicted["score"] == pytest.approx(first["score"], abs=2e-3)
    # the default dataset is the newest version of the model's own; other projects get 404s
    default = client.get(f"/v1/models/{model_id}/suggestions", params={"k": 3}).json()
    assert default["dataset_id"] == ds["id"] and len(default["suggestions"]) == 3
    other = theirs(settings)
    assert_problem(client.get(f"/v1/models/{model_id}/suggestions", headers=other), 404, "no model")
    labeled_only = upload(client, make_zip(class_folders({"a": 5, "b": 5}))).json()
    assert_problem(client.get(f"/v1/models/{model_id}/suggestions", params={"dataset_id": "f" * 32}), 404, "no dataset")
    assert client.get(f"/v1/models/{model_id}/suggestions", params={"dataset_id": labeled_only["id"]}).json()[
        "suggestions"] == []  # a dataset without unlabeled images: nothing to suggest
    assert client.get(f"/v1/models/{model_id}/suggestions", params={"strategy": "random"}).status_code == 422


def test_an_auto_job_self_trains_on_the_unlabeled_images_through_a_worker(client, settings):
    entries = {**class_folders({"ants": 5, "bees": 5}), **{f"unlabeled/u{i}.png": png(800 + i) for i in range(8)}}
    ds = upload(client, make_zip(entries)).json()
    job = client.post("/v1/jobs", json={"dataset_id": ds["id"], "backbone": "efficientnet_lite0", "image_size": 32,
                                        "time_budget_s": 10, "unlabeled": "pseudo_label"})
    assert job.status_code == 202, job.text
    Worker(settings).run(max_jobs=1)
    done = client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert done["status"] == "succeeded", done
    metrics = client.get(f"/v1/models/{done['model_id']}").json()["metrics"]
    report = metrics["semi_supervised"]
    assert report["used"] and report["unlabeled_images"] == 8 and set(report["pseudo_labels"]) == {"ants", "bees"}
    assert metrics["estimate"]["images"] == 10 and metrics["held_out"]["images"] == 10  # labeled images only
    # an explicit strategy cannot self-train: refused before it is queued
    assert_problem(client.post("/v1/jobs", json={"dataset_id": ds["id"], "strategy": "linear_probe",
                                                 "unlabeled": "pseudo_label"}), 422, "auto")


def test_graft_label_shows_the_suggestions_and_sends_the_answers(client, settings, trained, capsys, monkeypatch):
    """The CLI's labeling loop: Enter accepts the pre-label, a class name corrects it, 's' skips, 'q' stops;
    the answers reach the dataset as one change (a new version: a job used it)."""
    import io

    from tests.e2e.test_cli import graft
    from tests.support.live import uvicorn_thread

    ds, model_id, _ = trained
    rows = client.get(f"/v1/models/{model_id}/suggestions", params={"dataset_id": ds["id"], "k": 4}).json()[
        "suggestions"]
    other = {"ants": "bees", "bees": "ants"}[rows[1]["predicted_label"]]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"\n{other}\ns\nq\n"))
    with uvicorn_thread(create_app(settings)) as url:
        code, out, err = graft(capsys, monkeypatch, "label", model_id, "--dataset", ds["id"], "-k", "4", GRAFT_URL=url)
    assert code == 0, err
    assert "suggestions (margin)" in out and rows[0]["original_name"] in out and "labeled 2 image(s)" in out
    labeled = {i["id"]: i["label"] for i in images(client, out.split("dataset ")[-1].split()[0])}
    assert labeled[rows[0]["image_id"]] == rows[0]["predicted_label"] and labeled[rows[1]["image_id"]] == other
    assert labeled[rows[2]["image_id"]] is None and labeled[rows[3]["image_id"]] is None  # skipped, then stopped
    assert {i["id"]: i["label"] for i in images(client, ds["id"])}[rows[0]["image_id"]] is None  # the used version stays
