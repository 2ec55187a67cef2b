"""Training on from a model against training from scratch, when a class is added (issue 19).

    python bench/train_on.py                   # own `graft serve`, hymenoptera + bloodcells' platelets
    python bench/train_on.py --recipe '{"strategy": "fine_tune_top"}' --on '{"strategy": "fine_tune_top", "epochs": 4}'

Version 1 of the dataset is hymenoptera (train/ and val/, ants and bees); the base model is the
--recipe trained on it. Version 2 adds bloodcells' platelets (train/ and val/) as a third class.
On version 2 it then trains the same --recipe from ImageNet ("scratch") and each --on recipe from
the base model (`base_model_id`), and prints for each: seconds from submit to ready, val accuracy
(on the 153 + 93 val images, which no model trained on), and for the trained-on models what
metrics.base_model says (head rows kept, base against new on the same held-out images).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import DEFAULT_DATASET, own_server, train_once, zip_folder  # noqa: E402

BLOODCELLS = DEFAULT_DATASET.parent / "bloodcells"
DEFAULT_RECIPE = {"strategy": "fine_tune_top"}
DEFAULT_ON = [{"strategy": "linear_probe", "solver": "lbfgs", "augmentation": "light", "tta_flip": True},
              {"strategy": "fine_tune_top", "epochs": 4}]


def summary(model: dict, ready_s: float) -> dict:
    m = model["metrics"]
    out = {"ready_s": round(ready_s, 1), "val_accuracy": m["val_accuracy"],
           "val_accuracy_platelet": m["per_class"].get("platelet", {}).get("recall")}
    if "base_model" in m:
        b = m["base_model"]
        out["base_model"] = {"head": b["head"], "classes_added": b["classes_added"],
                             "compared_on": b.get("compared_on")}
    return out


def run(url: str, recipe: dict, on: list[dict]) -> dict:
    with httpx.Client(base_url=url, timeout=600) as client:
        v1 = client.post("/v1/datasets", files={"file": ("hymenoptera.zip", zip_folder(DEFAULT_DATASET))}).json()
        base_job, base_s = train_once(client, v1["id"], recipe["strategy"], {k: v for k, v in recipe.items()
                                                                             if k != "strategy"})
        base = client.get(f"/v1/models/{base_job['model_id']}").json()
        v2 = v1
        for split in ("train", "val"):
            files = sorted((BLOODCELLS / split / "platelet").iterdir())
            resp = client.post(f"/v1/datasets/{v2['id']}/images", data={"label": "platelet", "split": split},
                               files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in files])
            resp.raise_for_status()
            v2 = resp.json()
        out = {"base": summary(base, base_s), "dataset_v2": v2["split_counts"]}
        job, s = train_once(client, v2["id"], recipe["strategy"], {k: v for k, v in recipe.items() if k != "strategy"})
        out["scratch"] = {"recipe": recipe, **summary(client.get(f"/v1/models/{job['model_id']}").json(), s)}
        out["trained_on"] = []
        for r in on:
            job, s = train_once(client, v2["id"], r["strategy"],
                                {**{k: v for k, v in r.items() if k != "strategy"}, "base_model_id": base["id"]})
            out["trained_on"].append({"recipe": r, **summary(client.get(f"/v1/models/{job['model_id']}").json(), s)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=json.loads, default=DEFAULT_RECIPE, help="the base's and scratch's recipe")
    parser.add_argument("--on", type=json.loads, action="append", help="a recipe trained on from the base (repeat)")
    args = parser.parse_args()
    with own_server(1) as (url, _):
        result = run(url, args.recipe, args.on or DEFAULT_ON)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
