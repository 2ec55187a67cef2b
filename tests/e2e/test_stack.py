"""docker-compose.yml, verified as far as a machine without Docker allows.

1. The file validates against the Compose specification's JSON schema (check-jsonschema's
   vendored copy, so no network is needed).
2. Its services run here as processes, with the commands and environment the file and the
   Dockerfile give them (image ENV, then env_file, then `environment`), against a fresh database
   on the local PostgreSQL: `migrate` (twice: compose runs it on every `up`), `api` and two
   `worker`s (`--scale worker=2`). Only "where" values are mapped to this machine, each checked
   first against the compose file: the postgres service's address, the two volume mount points,
   the published port, the bind address (loopback here).
3. The README's flow (upload -> train -> predict, then export) runs through it with the `graft`
   CLI, and the image's HEALTHCHECK command passes against the api.

Not verified here: building the image, the NVIDIA device reservation, volume ownership, and
compose's own start ordering (the test follows depends_on by hand).
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from tests.support.data import PG_ADMIN_URL, REPO
from tests.support.live import dataset_folder, free_port, held_out, stop, venv_env, wait_http

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
GRAFT_SERVICES = ("migrate", "api", "worker")
TRAIN, VAL = 16, 6


# -- what the compose file and the Dockerfile say -----------------------------------------------
def dockerfile_runtime() -> tuple[dict[str, str], list[str]]:
    """The runtime stage's ENV and its HEALTHCHECK command."""
    lines = (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    stage = lines[next(i for i, line in enumerate(lines) if re.match(r"FROM .* AS runtime", line)):]
    env: dict[str, str] = {}
    for line in stage:
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in line[4:].split())
    health = next(line for line in stage if line.startswith("HEALTHCHECK"))
    return env, json.loads(health.split("CMD", 1)[1])


def env_file(path: Path) -> dict[str, str]:
    """A compose env file: KEY=VALUE lines; ${VAR} expands from earlier lines, '...' is literal."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, value = line.split("=", 1)
        if value[:1] == value[-1:] == "'":
            out[key] = value[1:-1]
        else:
            out[key] = re.sub(r"\$\{(\w+)\}", lambda m: out.get(m.group(1), ""), value.strip('"'))
    return out


def service_env(name: str) -> dict[str, str]:
    """A service's environment as the container sees it: image ENV < env_file < environment."""
    service = SERVICES[name]
    image_env, _ = dockerfile_runtime()
    env = dict(image_env)
    files = service["env_file"] if isinstance(service["env_file"], list) else [service["env_file"]]
    for f in files:
        # deploy/graft.env is the operator's copy of the example (it holds the secret).
        env.update(env_file(REPO / (f + ".example" if not (REPO / f).exists() else f)))
    env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    return env


def mounts(name: str) -> dict[str, str]:
    return dict(reversed(v.split(":")[:2]) for v in SERVICES[name]["volumes"])  # container path -> volume


def test_compose_file_is_valid_against_the_compose_specification():
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(REPO / "docker-compose.yml")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_services_are_wired_as_the_process_test_runs_them():
    assert set(SERVICES) == {"postgres", *GRAFT_SERVICES}
    assert SERVICES["migrate"]["command"] == ["graft", "migrate"] and SERVICES["migrate"]["restart"] == "no"
    assert SERVICES["api"]["command"] == ["graft", "serve", "--no-migrate"]
    assert SERVICES["api"]["environment"]["GRAFT_WORKERS"] == "0"  # the API trains nothing
    assert SERVICES["worker"]["command"] == ["graft", "worker"]
    gpu = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for name in GRAFT_SERVICES:
        s = SERVICES[name]
        assert s["image"] == SERVICES["api"]["image"] and s["env_file"] == SERVICES["api"]["env_file"]
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
        if name != "migrate":
            assert s["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        env = service_env(name)
        # The shared volumes are mounted exactly where the settings point.
        assert mounts(name) == {env["GRAFT_DATA_DIR"]: "graft-data", env["TORCH_HOME"]: "graft-weights"}
        # The database is the postgres service, with the role and database it creates.
        url = urlsplit(env["GRAFT_DATABASE_URL"])
        pg_env = SERVICES["postgres"]["environment"]
        assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432)
        assert url.username == pg_env["POSTGRES_USER"] and url.path == f"/{pg_env['POSTGRES_DB']}"
        assert url.password == env_file(REPO / "deploy/graft.env.example")["POSTGRES_PASSWORD"]
    assert "healthcheck" in SERVICES["postgres"] and "graft-postgres" in SERVICES["postgres"]["volumes"][0]
    assert set(COMPOSE["volumes"]) == {"graft-postgres", "graft-data", "graft-weights"}
    published = SERVICES["api"]["ports"][0].rsplit(":", 1)[1]
    assert published == service_env("api")["GRAFT_PORT"]
    # The image: multi-stage, non-root, and a HEALTHCHECK the worker (no HTTP) switches off.
    dockerfile = (REPO / "Dockerfile").read_text()
    assert dockerfile.count("\nFROM ") >= 2 and "\nUSER graft" in dockerfile
    assert SERVICES["worker"]["healthcheck"] == {"disable": True}


# -- the stack, as processes --------------------------------------------------------------------
@pytest.fixture
def empty_database():
    """A fresh PostgreSQL database with no schema: the stack's migrate service must create it."""
    name = f"graft_stack_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


class Stack:
    """The compose services as local processes sharing one data dir (the volumes) and database."""

    def __init__(self, root: Path, database_url: str):
        self.root, self.database_url, self.port = root, database_url, free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = ""  # the stack requires keys: set once `graft keys create` has made one

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def env(self, service: str) -> dict[str, str]:
        env = service_env(service)
        local = {"GRAFT_DATABASE_URL": self.database_url,
                 "GRAFT_DATA_DIR": str(self.root / "graft-data"),   # the graft-data volume
                 "TORCH_HOME": str(self.root / "graft-weights"),    # the graft-weights volume
                 "HF_HOME": str(self.root / "graft-weights" / "huggingface"),
                 "GRAFT_HOST": "127.0.0.1",                         # loopback only on this machine
                 "GRAFT_PORT": str(self.port),                      # the published port
                 "HOME": str(self.root / "home")}
        for key in ("PATH", "VIRTUAL_ENV"):  # the image's venv is this checkout's venv
            env.pop(key, None)
        return venv_env(**{**env, **local})

    def command(self, service: str) -> list[str]:
        argv = list(SERVICES[service]["command"])
        env = self.env(service)
        return [shutil.which(argv[0], path=env["PATH"]), *argv[1:]]

    def run(self, service: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(service), env=self.env(service), cwd=self.root, capture_output=True,
                              text=True, timeout=180)

    def start(self, service: str, replica: int = 1) -> None:
        log = open(self.root / f"{service}-{replica}.log", "w")
        self.procs[f"{service}-{replica}"] = subprocess.Popen(self.command(service), env=self.env(service),
                                                              cwd=self.root, stdout=log, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def cli(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        env = venv_env(GRAFT_URL=self.url, GRAFT_API_KEY=self.api_key, COLUMNS="200")
        done = subprocess.run([shutil.which("graft", path=env["PATH"]), *argv], env=env, cwd=self.root,
                              capture_output=True, text=True, timeout=300)
        if check:
            assert done.returncode == 0, (argv, done.stdout, done.stderr, self.logs())
        return done


@pytest.fixture
def stack(tmp_path, empty_database):
    for d in ("graft-data", "graft-weights", "home"):
        (tmp_path / d).mkdir()
    s = Stack(tmp_path, empty_database)
    yield s
    for proc in s.procs.values():  # `docker compose stop`: every container gets SIGTERM at once
        proc.send_signal(signal.SIGTERM)
    codes = {name: stop(proc, signal_first=False) for name, proc in s.procs.items()}
    assert all(code == 0 for code in codes.values()), (codes, s.logs())  # a clean `docker compose stop`


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_stack_runs_the_readme_flow_with_two_workers(stack, tmp_path):
    # postgres is healthy (the local server) -> migrate completes (and is safe to run again) ->
    for _ in range(2):
        done = stack.run("migrate")
        assert done.returncode == 0, done.stderr
    # Keys are required: the first admin key is made on the server's machine, as the README says.
    made = subprocess.run([shutil.which("graft", path=stack.env("api")["PATH"]), "keys", "create", "--project", "team",
                           "--scope", "admin"], env=stack.env("api"), cwd=stack.root, capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    stack.api_key = made.stdout.strip()
    # -> api and `--scale worker=2`.
    stack.start("api")
    stack.start("worker", 1)
    stack.start("worker", 2)
    wait_http(f"{stack.url}/readyz", stack.procs["api-1"], stack.root / "api-1.log")
    ready = httpx.get(f"{stack.url}/readyz").json()
    assert ready["checks"]["database"]["dialect"] == "postgresql"
    _, healthcheck = dockerfile_runtime()  # the image's HEALTHCHECK, run against this api
    probe = subprocess.run([sys.executable, *healthcheck[1:]], env=stack.env("api"), capture_output=True, timeout=30)
    assert probe.returncode == 0, probe.stderr

    # 1. Upload: a folder, zipped on the fly; the report lists what was skipped.
    folder = dataset_folder(tmp_path / "hymenoptera", TRAIN, VAL)
    upload = stack.cli("datasets", "upload", str(folder))
    assert "ants" in upload.stdout and "bees" in upload.stdout and "notes.txt" in upload.stdout
    [dataset] = json.loads(stack.cli("datasets", "list", "--json").stdout)
    assert dataset["class_counts"] == {"ants": TRAIN + VAL, "bees": TRAIN + VAL}

    # 2. Train: two jobs at once, so each worker takes one; watch one live.
    recipe = ["--strategy", "linear_probe", "--image-size", "96", "--epochs", "30"]
    wait_for_workers(stack)
    # The first job fine-tunes for a few seconds, so the second one is left to the other worker.
    other = json.loads(stack.cli("train", dataset["id"], "--strategy", "fine_tune", "--image-size", "96",
                                 "--epochs", "4", "--json").stdout)
    watched = stack.cli("train", dataset["id"], *recipe, "--watch")
    assert "30/30" in watched.stderr and "epochs" in watched.stderr  # the progress bar's last frame
    assert "val_accuracy" in watched.stdout and "confusion matrix" in watched.stdout
    final = json.loads(stack.cli("jobs", "watch", other["id"], "--json").stdout)
    assert final["job"]["status"] == "succeeded"
    jobs = json.loads(stack.cli("jobs", "list", "--json").stdout)
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"]
    ran_on = {j["id"]: running_worker(stack.url, j["id"], stack.auth) for j in jobs}
    assert httpx.get(f"{stack.url}/v1/jobs").status_code == 401  # nothing without a key
    assert len(set(ran_on.values())) == 2, ran_on  # one job per worker

    # 3. Predict held-out photos with the watched job's model.
    [model] = [m for m in json.loads(stack.cli("models", "list", "--json").stdout) if m["id"] != final["model"]["id"]]
    photos = held_out("ants", 2, VAL) + held_out("bees", 2, VAL)
    answer = json.loads(stack.cli("predict", model["id"], *map(str, photos), "--json").stdout)
    assert [r["filename"] for r in answer["results"]] == [p.name for p in photos]
    for result in answer["results"]:  # how well it predicts is test_e2e's business; here: the plumbing
        assert {p["label"] for p in result["predictions"]} == {"ants", "bees"}
        assert abs(sum(p["score"] for p in result["predictions"]) - 1) < 1e-4
    assert model["metrics"]["val_accuracy"] >= 0.6
    table = stack.cli("predict", model["id"], str(photos[0])).stdout
    assert photos[0].name in table

    # 4. Take the model away.
    exported = stack.cli("models", "export", model["id"], "--format", "safetensors", "-o", str(tmp_path))
    [zip_path] = tmp_path.glob("graft-*-safetensors.zip")
    assert zip_path.name in exported.stdout.replace("\n", "")
    assert sorted(zipfile.ZipFile(zip_path).namelist()) == ["USAGE.md", "manifest.json", "model.safetensors"]

    # 5. The api's /metrics sees the whole fleet through the database.
    m = metrics(stack.url)
    assert m[("graft_jobs", (("status", "succeeded"),))] == 2 and m[("graft_queue_depth", ())] == 0
    assert m[("graft_job_duration_seconds_count", (("status", "succeeded"),))] == 2
    speed = [v for (name, labels), v in m.items() if name == "graft_training_images_per_second"]
    assert speed and all(v > 0 for v in speed)
    assert m[("graft_predict_latency_seconds_count", (("status", "200"),))] == 2
    assert m[("graft_models_loaded", ())] == 1 and m[("graft_database_up", ())] == 1


def wait_for_workers(stack: Stack, timeout: float = 90) -> None:
    """Both workers registered and polling, so the two jobs go to different workers."""
    import time

    deadline = time.monotonic() + timeout
    while len(httpx.get(f"{stack.url}/v1/workers", headers=stack.auth).json()) < 2:
        assert time.monotonic() < deadline, stack.logs()
        assert all(p.poll() is None for p in stack.procs.values()), stack.logs()
        time.sleep(0.3)


def running_worker(url: str, job_id: str, headers: dict) -> str:
    events = httpx.get(f"{url}/v1/jobs/{job_id}/events", headers=headers).json()
    return next(e["data"]["worker_id"] for e in events if e["kind"] == "status" and e["data"]["status"] == "running")
