"""The dashboard's labeling view (issue 16), "none of these" and multi-label models (issue 17), in
headless Chromium like tests/e2e/test_dashboard.py: a model trained on a few labeled photos suggests
which of the unlabeled ones to label; one is accepted, one corrected, the labels saved as a new
version of the dataset, and "train again" queues a job on it. "Try it" shows "unknown" for the photos
/predict calls unknown, and a multi-label model's labels over their thresholds."""
from __future__ import annotations

import time

import httpx

from tests.e2e.test_dashboard import page, server  # noqa: F401  (fixtures)
from tests.e2e.test_dashboard import drop_files
from tests.support.data import hymenoptera_files, make_zip
from tests.support.multilabel import bloodcell_files, draw_mosaics, multilabel_zip

LABELED, UNLABELED = 8, 6  # photos per class


def labeling_zip() -> bytes:
    entries = {f"{label}/{p.name}": p.read_bytes() for label in ("ants", "bees")
               for p in hymenoptera_files("train", label)[:LABELED]}
    entries |= {f"unlabeled/{label}-{p.name}": p.read_bytes() for label in ("ants", "bees")
                for p in hymenoptera_files("val", label)[:UNLABELED]}
    return make_zip(entries)


def trained_model(url: str, zipped: bytes | None = None, **job) -> tuple[dict, str]:
    with httpx.Client(base_url=url, timeout=60) as api:
        dataset = api.post("/v1/datasets", files={"file": ("to-label.zip", zipped or labeling_zip())}).json()
        job = api.post("/v1/jobs", json={"dataset_id": dataset["id"], **(job or {"strategy": "linear_probe"})}).json()
        deadline = time.monotonic() + 180
        while (job := api.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "succeeded", job
        return dataset, job["model_id"]


def test_the_labeling_view_accepts_corrects_saves_and_trains_again(server, page):  # noqa: F811
    url, _ = server
    dataset, model_id = trained_model(url)
    assert dataset["report"]["unlabeled_count"] == 2 * UNLABELED, dataset
    page.goto(url + "/")
    page.click(f"[data-testid=model][data-id='{model_id}']")
    page.wait_for_selector("#model-detail:not([hidden])")
    assert "unknown below" in page.inner_text("#model-metrics")  # the model's "none of these" threshold
    page.click("#label-box summary")
    page.click("#label-load")
    page.wait_for_function("n => document.querySelectorAll('[data-testid=suggestion] img').length === n &&"
                           " [...document.querySelectorAll('[data-testid=suggestion] img')].every(i => i.complete"
                           " && i.naturalWidth > 0)", arg=2 * UNLABELED)
    assert f"{2 * UNLABELED} unlabeled image(s)" in page.inner_text("#label-status")
    cards = page.query_selector_all("[data-testid=suggestion]")
    first, second = cards[0], cards[1]
    guess = first.query_selector("[data-testid=accept]").inner_text().split()[1]
    first.query_selector("[data-testid=accept]").click()
    second_guess = second.query_selector("[data-testid=accept]").inner_text().split()[1]
    other = {"ants": "bees", "bees": "ants"}[second_guess]
    second.query_selector("[data-testid=label-choice]").select_option(other)
    assert page.is_enabled("#label-save")
    page.click("#label-save")
    page.wait_for_selector("#label-status:has-text('saved 2 label(s)')")
    assert f"{2 * UNLABELED - 2} still unlabeled" in page.inner_text("#label-status")
    with httpx.Client(base_url=url, timeout=30) as api:
        versions = [d for d in api.get("/v1/datasets").json() if d["name"] == dataset["name"]]
        newest = max(versions, key=lambda d: d["version"])
        assert newest["version"] == dataset["version"] + 1  # a job used the first: it stays as it was
        labels = {i["id"]: i["label"] for i in api.get(f"/v1/datasets/{newest['id']}/images",
                                                       params={"limit": 1000}).json()}
        assert labels[first.get_attribute("data-id")] == guess and labels[second.get_attribute("data-id")] == other
        page.click("#label-train")
        page.wait_for_selector("#label-status:has-text('queued job')")
        jobs = api.get("/v1/jobs").json()
        assert any(j["dataset_id"] == newest["id"] for j in jobs), jobs
    assert not page.errors, page.errors


def predicted_in_page(page, files) -> list[str]:
    drop_files(page, "#predict-drop", [(p.name, p.read_bytes(), "image/jpeg") for p in files])
    page.wait_for_function("n => document.querySelectorAll('.prediction .top-label').length === n", arg=len(files))
    return [e.inner_text() for e in page.query_selector_all(".prediction .top-label")]


def test_try_it_shows_unknown_where_predict_says_it(server, page, tmp_path):  # noqa: F811
    url, _ = server
    _, model_id = trained_model(url)
    photos = [p for c in ("eosinophil", "platelet", "neutrophil") for p in bloodcell_files("val", c)[:2]]
    photos += [hymenoptera_files("val", "bees")[UNLABELED + 1]]
    with httpx.Client(base_url=url, timeout=60) as api:
        answer = api.post(f"/v1/models/{model_id}/predict",
                          files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]).json()["results"]
    expected = ["unknown" if r["unknown"] else r["predictions"][0]["label"] for r in answer]
    assert "unknown" in expected[:-1], answer  # microscopy, to a model of ants and bees
    page.goto(url + "/")
    page.click(f"[data-testid=model][data-id='{model_id}']")
    page.wait_for_selector("#model-detail:not([hidden])")
    assert predicted_in_page(page, photos) == expected
    assert len(page.query_selector_all("[data-testid=unknown]")) == expected.count("unknown")
    assert len(page.query_selector_all("[data-testid=ood-score]")) == len(photos)
    assert not page.errors, page.errors


def test_a_multi_label_model_shows_its_labels_and_map(server, page, tmp_path):  # noqa: F811
    url, _ = server
    classes = {"ants": ("hymenoptera", "ants"), "cells": ("bloodcells", "eosinophil"),
               "platelets": ("bloodcells", "platelet")}
    _, model_id = trained_model(url, multilabel_zip(draw_mosaics(classes, "train", 60, seed=3, sizes=(1, 2))),
                                image_size=224)
    mosaics = draw_mosaics(classes, "val", 3, seed=11, sizes=(2,))
    files = []
    for i, (data, _) in enumerate(mosaics):
        (path := tmp_path / f"mosaic{i}.jpg").write_bytes(data)
        files.append(path)
    with httpx.Client(base_url=url, timeout=60) as api:
        answer = api.post(f"/v1/models/{model_id}/predict",
                          files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in files]).json()["results"]
    page.goto(url + "/")
    page.click(f"[data-testid=model][data-id='{model_id}']")
    page.wait_for_selector("#model-detail:not([hidden])")
    metrics = page.inner_text("#model-metrics")
    assert "mAP (macro)" in metrics and "Hamming loss" in metrics
    shown = predicted_in_page(page, files)
    assert shown == [", ".join(r["labels"]) or "no label" for r in answer]
    assert any(len(r["labels"]) == 2 for r in answer), answer  # two photos side by side, both named
    assert not page.errors, page.errors
