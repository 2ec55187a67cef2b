"""Big datasets on small machines (issue 22): time and memory as the number of images grows.

    python bench/scale.py                             # N = 1,000, 5,000, 20,000; linear_probe and auto
    python bench/scale.py --sizes 1000 --strategies linear_probe
    python bench/scale.py --repo /tmp/graft-before    # the same against another checkout (before/after)

For each N it writes (once, kept under --work) a zip of N distinct 400x300 JPEGs made from the shared
sets (../shared/datasets: hymenoptera and bloodcells, 10 classes) by random crops, flips and colour
jitter, starts `graft serve` (1 worker, SQLite, fresh data dir), uploads the zip (streamed from disk),
then submits each strategy in turn and waits for its model. It reports the upload time, submit ->
ready per strategy, the peak RSS of the API process and of the worker process in each phase (VmHWM,
reset per phase through /proc/<pid>/clear_refs, and VmRSS / RssAnon / RssFile sampled every 0.1 s from
/proc/<pid>/status) and the disk the decoded-image cache uses. One JSON line per N on stdout.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.e2e import REPO, own_server, server_pid

SHARED = Path(os.environ.get("GRAFT_SHARED_DATASETS") or REPO.parent / "shared" / "datasets")
SIZE = (400, 300)


# --- the data -------------------------------------------------------------------------------------

def sources() -> list[tuple[Path, str]]:
    """Every photo of the shared sets with its class (hymenoptera's GIF placeholder left out)."""
    out = []
    for name in ("hymenoptera", "bloodcells"):
        for p in sorted((SHARED / name).glob("*/*/*")):
            if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                out.append((p, p.parent.name))
    return out


def variant(args: tuple[int, str]) -> bytes:
    """Image i: a random crop (50-100% of each side), maybe mirrored, brightness/contrast/saturation
    in [0.7, 1.3], resized to 400x300, JPEG quality 90. Seeded by i: the same zip every time."""
    from PIL import Image, ImageEnhance, ImageOps

    i, path = args
    rng = random.Random(i)
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(0.7, 1.3))
    buf = io.BytesIO()
    img.resize(SIZE, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def generated_zip(n: int, work: Path) -> Path:
    """work/scale-<n>.zip: n distinct images as <class>/<i>.jpg (written once, then reused)."""
    path = work / f"scale-{n}.zip"
    if path.exists():
        return path
    work.mkdir(parents=True, exist_ok=True)
    pool = sources()
    jobs = [(i, str(pool[i % len(pool)][0])) for i in range(n)]
    tmp = path.with_suffix(".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf, ProcessPoolExecutor(os.cpu_count() or 2) as ex:
        for (i, _), data in zip(jobs, ex.map(variant, jobs, chunksize=64)):
            zf.writestr(f"scale/{pool[i % len(pool)][1]}/{i:05d}.jpg", data)
    tmp.replace(path)
    return path


# --- memory, from /proc -----------------------------------------------------------------------------

def status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


class Sampler:
    """Every 0.1 s: VmRSS, RssAnon and RssFile of the API and its worker; peaks per phase, with the
    kernel's own peak (VmHWM) reset at each phase's start."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, api: int):
        self.api = api
        self.phase = None
        self.peaks: dict[str, dict[str, dict[str, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def procs(self) -> dict[str, int]:
        kids = children(self.api)
        return {"api": self.api, **({"worker": kids[0]} if kids else {})}

    def start(self, phase: str) -> None:
        for pid in self.procs().values():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            except OSError:
                pass
        self.phase = phase

    def end(self) -> dict:
        """The phase's peaks in MB, VmHWM included."""
        phase, self.phase = self.phase, None
        peaks = self.peaks.setdefault(phase, {})
        for name, pid in self.procs().items():
            hwm = status_kb(pid, "VmHWM")
            if hwm is not None:
                peaks.setdefault(name, {})["VmHWM"] = hwm
        return {name: {k: round(v / 1024) for k, v in vals.items()} for name, vals in peaks.items()}

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            phase = self.phase
            if phase is None:
                continue
            peaks = self.peaks.setdefault(phase, {})
            for name, pid in self.procs().items():
                for field in self.FIELDS:
                    kb = status_kb(pid, field)
                    if kb is not None:
                        slot = peaks.setdefault(name, {})
                        slot[field] = max(slot.get(field, 0), kb)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def du_mb(folder: Path) -> float:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
    return round(total / 2**20, 1)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- one size ---------------------------------------------------------------------------------------

def wait_for(client: httpx.Client, job_id: str) -> dict:
    seen = False
    while True:
        resp = client.get(f"/v1/jobs/{job_id}")
        if resp.status_code == 404 and not seen:
            # once seen here: a GET right after the POST answered 404 (the POST's transaction not yet
            # visible to the next request); the job is there a moment later
            time.sleep(0.1)
            continue
        resp.raise_for_status()
        seen, job = True, resp.json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.1)


def phase_seconds(client: httpx.Client, job_id: str) -> dict[str, dict]:
    """Seconds from each phase's first event to the next phase's, and the phase's total (in its
    unit), from the job's own event log: where submit -> ready went."""
    events = client.get(f"/v1/jobs/{job_id}/events").json()
    marks: list[tuple[str, datetime]] = []
    for e in events:
        name = e["data"].get("phase") or (f"status: {e['data']['status']}" if e["kind"] == "status" else None)
        if name and (not marks or marks[-1][0] != name):
            marks.append((name, datetime.fromisoformat(e["created_at"])))
    totals = {e["data"]["phase"]: e["data"].get("total") for e in events if e["data"].get("phase")}
    out: dict[str, float] = {}
    for (name, at), (_, until) in zip(marks, marks[1:]):
        out[name] = round(out.get(name, 0.0) + (until - at).total_seconds(), 2)
    return {name: {"s": s, "total": totals.get(name)} for name, s in out.items()}


def feature_ratio(phases: dict, bare: float) -> float | None:
    """The job's feature pass (images through the backbone a second) over the bare rate."""
    p = phases.get("extracting features")
    return round(p["total"] / p["s"] / bare, 2) if p and p["total"] and p["s"] else None


def bare_features_per_s() -> float:
    """The machine's frozen Lite0 feature rate right now (bench/backbones.py, its own process): this
    VM's speed drifts by half over hours, so each size's rates are read against this, measured just
    before it."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "backbones.py"), "--backbones", "efficientnet_lite0",
                          "--throughput-only"], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def run_size(n: int, zip_path: Path, strategies: list[str], repo: Path, env: dict, job_extra: dict) -> dict:
    out: dict = {"images": n, "zip_mb": round(zip_path.stat().st_size / 2**20, 1), "load_before": loadavg(),
                 "bare_features_per_s": bare_features_per_s()}
    with own_server(workers=1, env=env, repo=repo) as (url, data_dir):
        sampler = Sampler(server_pid(data_dir))
        try:
            client = httpx.Client(base_url=url, timeout=3600)
            sampler.start("upload")
            t0 = time.perf_counter()
            with zip_path.open("rb") as fh:
                resp = client.post("/v1/datasets", files={"file": ("scale.zip", fh, "application/zip")},
                                   data={"name": f"scale-{n}"})
            out["upload_s"] = round(time.perf_counter() - t0, 2)
            resp.raise_for_status()
            dataset = resp.json()
            out["num_images"] = dataset["num_images"]
            out["peak_mb"] = {"upload": sampler.end()}
            print(json.dumps({"so_far": out}), file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            listed = client.get(f"/v1/datasets/{dataset['id']}/images", params={"limit": 1000, "offset": n - 1000})
            out["list_images_1000_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            listed.raise_for_status()
            for strategy in strategies:
                sampler.start(strategy)
                t0 = time.perf_counter()
                job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "strategy": strategy,
                                                    **job_extra}).json()
                job = wait_for(client, job["id"])
                ready = round(time.perf_counter() - t0, 2)
                out["peak_mb"][strategy] = sampler.end()
                if job["status"] != "succeeded":
                    out[strategy] = {"status": job["status"], "error": job.get("error"), "submit_to_ready_s": ready}
                    continue
                metrics = client.get(f"/v1/models/{job['model_id']}").json()["metrics"]
                out[strategy] = {"submit_to_ready_s": ready, "images_per_s": round(n / ready, 1),
                                 "phases_s": (phases := phase_seconds(client, job["id"])),
                                 "feature_pass_vs_bare": feature_ratio(phases, out["bare_features_per_s"]),
                                 "val_accuracy": metrics["val_accuracy"],
                                 "train_seconds": metrics.get("train_seconds"),
                                 "chosen": (metrics.get("auto") or {}).get("chosen", {}).get("strategy")}
                print(json.dumps({"so_far": out}), file=sys.stderr, flush=True)
            out["cache_disk_mb"] = du_mb(data_dir / "cache" / "decoded")
        finally:
            sampler.close()
    shutil.rmtree(data_dir, ignore_errors=True)  # the server's fresh data dir: gigabytes at 20,000
    out["load_after"] = loadavg()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--strategies", nargs="+", default=["linear_probe", "auto"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/graft-scale"), help="where the zips are kept")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose `graft serve` runs")
    parser.add_argument("--memory-mb", type=int, help="GRAFT_WORKER_MEMORY_MB for the worker")
    parser.add_argument("--job", default="{}", help="extra job fields as JSON")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--phases", action="store_true", help="one job in one process, without the "
                        "server: peak RSS of each of its phases (the first strategy given)")
    args = parser.parse_args()
    env = {"GRAFT_WORKER_MEMORY_MB": str(args.memory_mb)} if args.memory_mb else {}
    for n in args.sizes:
        zip_path = generated_zip(n, args.work)
        if args.generate_only:
            print(json.dumps({"images": n, "zip": str(zip_path), "mb": round(zip_path.stat().st_size / 2**20, 1)}))
            continue
        if args.phases:
            print(json.dumps(phases_run(n, zip_path, args.repo, args.strategies[0], args.memory_mb or 1024)), flush=True)
            continue
        rev = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False).stdout.strip()
        result = run_size(n, zip_path, args.strategies, args.repo, env, json.loads(args.job))
        print(json.dumps({"repo": str(args.repo), "rev": rev or None, **result}), flush=True)



# --- where the memory goes, phase by phase, in one process (--phases) --------------------------------

PHASES_CHILD = r'''
import hashlib, json, shutil, sys, tempfile, threading, time, zipfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from workers.backbones import get_backbone
from workers.config import TrainConfig
from workers.data import DatasetImages, DecodedCache, LabeledImage, prepare_data
from workers.training import train

zip_path, strategy, memory_mb = sys.argv[2], sys.argv[3], int(sys.argv[4])
zf = zipfile.ZipFile(zip_path)
names, rows = {}, []
for info in zf.infolist():
    if info.is_dir():
        continue
    sha = hashlib.sha256(zf.read(info)).hexdigest()
    names[sha] = info.filename
    rows.append(LabeledImage(sha, info.filename.split("/")[-2], None))
dataset = DatasetImages(sorted({r.label for r in rows}), rows)

def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

class Phases:
    def __init__(self):
        self.phase, self.peaks, self.lock = "setup", {}, threading.Lock()
        threading.Thread(target=self.sample, daemon=True).start()
    def enter(self, phase):
        with self.lock:
            self.close()
            open("/proc/self/clear_refs", "w").write("5")
            self.phase = phase
    def close(self):
        p = self.peaks.setdefault(self.phase, {"start_anon": kb("RssAnon")})
        p["VmHWM"] = max(p.get("VmHWM", 0), kb("VmHWM"))
    def sample(self):
        while True:
            with self.lock:
                p = self.peaks.setdefault(self.phase, {"start_anon": kb("RssAnon")})
                for f in ("RssAnon", "RssFile"):
                    p[f] = max(p.get(f, 0), kb(f))
            time.sleep(0.05)
    # the training Control
    def progress(self, update):
        if "phase" in update and update["phase"] != self.phase:
            self.enter(update["phase"])
    def stop_if_asked(self): pass
    def save_checkpoint(self, epoch, state): pass
    def resume_state(self): return None

phases = Phases()
spec = get_backbone("efficientnet_lite0")
features = spec.build_features(pretrained=True)
pre = spec.preprocessing
config = TrainConfig(strategy=strategy)
cache_dir = tempfile.mkdtemp(prefix="graft-phases-")
try:
    cache = DecodedCache(Path(cache_dir), 16 * 2**30, memory_bytes=memory_mb * 2**20)
except TypeError:  # a checkout from before issue 22
    cache = DecodedCache(Path(cache_dir), 16 * 2**30)
phases.enter("ready (torch, backbone loaded)")
t0 = time.perf_counter()
data = prepare_data(dataset, lambda sha: zf.read(names[sha]), config, pre, phases, cache)
phases.enter("data prepared")
prepared_s = time.perf_counter() - t0
result = train(config, data, features, spec.feature_dim, phases, torch.device("cpu"))
phases.enter("done")
phases.close()
shutil.rmtree(cache_dir, ignore_errors=True)
out = {"seconds": round(time.perf_counter() - t0, 1), "prepare_s": round(prepared_s, 1),
       "val_accuracy": result.metrics["val_accuracy"],
       "phases": {k: {f: round(v / 1024) for f, v in p.items()} for k, p in phases.peaks.items()}}
print(json.dumps(out))
'''


def phases_run(n: int, zip_path: Path, repo: Path, strategy: str, memory_mb: int) -> dict:
    """Peak RSS of each phase of one job (decoding, features, training...) run in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", PHASES_CHILD, str(repo), str(zip_path), strategy, str(memory_mb)],
                          cwd=repo, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return {"images": n, "repo": str(repo), "strategy": strategy, **json.loads(proc.stdout.strip().splitlines()[-1])}


if __name__ == "__main__":
    main()
