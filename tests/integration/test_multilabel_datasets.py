"""Multi-label datasets (issue 17) through the API: manifests with several labels per image, the
report that describes them, and the manifests that are refused with what to write instead."""
from __future__ import annotations

import json

import pytest

from tests.support.ingest import Guard, assert_problem, client, guard, make_zip, png, upload  # noqa: F401


def csv_zip(rows: list[str], header: str = "path,labels", images: int | None = None) -> bytes:
    """A zip of img<i>.png and a labels.csv of `rows` (the lines after the header)."""
    n = images if images is not None else len(rows)
    entries = {f"img{i}.png": png(100 + i) for i in range(n)}
    entries["labels.csv"] = ("\n".join([header, *rows]) + "\n").encode()
    return make_zip(entries)


def jsonl_zip(rows: list[dict]) -> bytes:
    entries = {f"img{i}.png": png(200 + i) for i in range(len(rows))}
    entries["labels.jsonl"] = "\n".join(json.dumps(r) for r in rows).encode()
    return make_zip(entries)


def test_csv_with_several_labels_per_image_makes_a_multi_label_dataset(client):
    # 6 cats only, 6 cats and dogs, 6 dogs and "x;y" (a name with ';', quoted in the cell), 3 with no label.
    rows = ([f"img{i}.png,cat" for i in range(6)] + [f"img{i}.png,cat;dog" for i in range(6, 12)]
            + [f'img{i}.png,"dog;""x;y"""' for i in range(12, 18)] + [f"img{i}.png," for i in range(18, 21)])
    resp = upload(client, csv_zip(rows))
    assert resp.status_code == 201, resp.text
    dataset = resp.json()
    assert dataset["task"] == "multi_label" and dataset["trainable"], dataset["report"]["problems"]
    assert dataset["classes"] == ["cat", "dog", "x;y"]
    assert dataset["class_counts"] == {"cat": 12, "dog": 12, "x;y": 6}
    report = client.get(f"/v1/datasets/{dataset['id']}/report").json()
    assert report["task"] == "multi_label" and report["num_images"] == 21
    assert report["images_without_labels"] == {"total": 3, "unsplit": 3}
    assert report["labels_per_image"] == {"0": 3, "1": 6, "2": 12}
    co = report["label_cooccurrence"]
    assert co["labels"] == ["cat", "dog", "x;y"]
    assert co["matrix"] == [[12, 6, 0], [6, 12, 6], [0, 6, 6]]
    # The images list shows each image's labels, and filtering by a label finds every image that has it.
    dogs = client.get(f"/v1/datasets/{dataset['id']}/images", params={"label": "dog", "limit": 100}).json()
    assert len(dogs) == 12 and all("dog" in img["labels"] for img in dogs)
    everything = client.get(f"/v1/datasets/{dataset['id']}/images", params={"limit": 100}).json()
    assert sorted(len(img["labels"]) for img in everything).count(0) == 3
    assert {img["label"] for img in everything} >= {"cat", "cat; dog", "dog; x;y"}


def test_jsonl_labels_lists_and_a_label_below_the_minimum(client):
    rows = [{"path": f"img{i}.png", "labels": ["a", "b"] if i % 2 else ["a"]} for i in range(12)]
    rows += [{"path": "img12.png", "labels": ["rare"]}, {"path": "img13.png", "labels": []}]
    dataset = upload(client, jsonl_zip(rows)).json()
    assert dataset["task"] == "multi_label"
    assert dataset["class_counts"] == {"a": 12, "b": 6, "rare": 1}
    assert not dataset["trainable"]
    assert any("'rare' has 1 image" in p for p in dataset["report"]["problems"])


def test_a_label_on_every_image_cannot_be_learned(client):
    rows = [f"img{i}.png,{'a;b' if i % 2 else 'a'}" for i in range(12)]
    dataset = upload(client, csv_zip(rows)).json()
    assert not dataset["trainable"]
    assert any("'a' is on every one of the 12 images" in p for p in dataset["report"]["problems"])


@pytest.mark.parametrize("zipped, words", [
    # both columns: single- and multi-label rows mixed
    (lambda: csv_zip(["img0.png,a,a;b"], header="path,label,labels"), ("both a label and a labels column",
                                                                        "separated by ';'")),
    # JSONL lines of both kinds
    (lambda: jsonl_zip([{"path": "img0.png", "labels": ["a"]}, {"path": "img1.png", "label": "b"}]),
     ("mixes single-label and multi-label lines", "line 1", "line 2", '"labels": ["a", "b"]')),
    (lambda: jsonl_zip([{"path": "img0.png", "labels": ["a"], "label": "a"}]), ("both \"label\" and \"labels\"",)),
    # unknown label syntax
    (lambda: jsonl_zip([{"path": "img0.png", "labels": "a;b"}]), ("must be a json list of strings", '[]')),
    (lambda: jsonl_zip([{"path": "img0.png", "labels": [["a"]]}]), ("must be a json list of strings",)),
    (lambda: csv_zip(['img0.png,"""a""b;c"']), ("cannot be read", "quoted")),
    # empty names inside a label list
    (lambda: csv_zip(["img0.png,a;;b"]), ("empty name", "may be empty")),
    (lambda: jsonl_zip([{"path": "img0.png", "labels": ["a", " "]}]), ("empty name", "may be empty")),
    # a label over the length limit, or not a label at all
    (lambda: csv_zip([f"img0.png,a;{'x' * 101}"]), ("line 2", "101 characters", "at most 100")),
    (lambda: jsonl_zip([{"path": "img0.png", "labels": ["=cmd()"]}]), ("formula", "at most 100 characters")),
])
def test_bad_multi_label_manifests_are_refused_with_what_is_allowed(client, guard, zipped, words):
    body = assert_problem(upload(client, zipped()), 422, *words)
    assert body["status"] == 422
    guard.check_unchanged()


def test_a_multi_label_dataset_refuses_single_label_changes(client):
    rows = [f"img{i}.png,{'a;b' if i % 2 else 'a'}" for i in range(10)] + [f"img{i}.png,b" for i in range(10, 16)]
    dataset = upload(client, csv_zip(rows)).json()
    resp = client.post(f"/v1/datasets/{dataset['id']}/images", data={"label": "a"},
                       files=[("file", ("new.png", png(999), "image/png"))])
    assert_problem(resp, 422, "multi-label", "labels.csv")
