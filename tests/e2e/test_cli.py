"""The `graft` command: running Graft (serve, worker, migrate) and using it (the client commands)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import httpx
import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from service import cli
from service.cli import commands as cli_commands
from service.app import create_app
from service.client import GraftAPIError, GraftClient, parse_sse, zip_folder
from service.api.observability import schema_heads
from tests.support.data import REPO, subset_zip
from tests.support.live import child_pids, dataset_folder, free_port, uvicorn_thread, venv_env, wait_gone, wait_http


def graft(capsys, monkeypatch, *argv: str, **env: str) -> tuple[int, str, str]:
    """Run `graft ARGV...` in this process, as the console script does; returns (code, stdout, stderr)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- running Graft ------------------------------------------------------------------------------
def test_help_lists_every_command_and_keeps_the_server_options():
    runner = CliRunner()
    top = runner.invoke(cli.app, ["--help"])
    assert top.exit_code == 0
    for command in ("serve", "worker", "migrate", "datasets", "train", "predict", "models", "jobs"):
        assert command in top.output
    serve = runner.invoke(cli.app, ["serve", "--help"]).output
    for option in ("--host", "--port", "--workers", "--no-migrate", "--log-format"):
        assert option in serve
    assert "--max-jobs" in runner.invoke(cli.app, ["worker", "--help"]).output
    for group, commands in (("datasets", ("upload", "list", "show")), ("models", ("list", "show", "export")),
                            ("jobs", ("list", "show", "watch", "cancel"))):
        out = runner.invoke(cli.app, [group, "--help"]).output
        assert all(c in out for c in commands), out


def test_migrate_creates_the_schema(tmp_path):
    env = venv_env(GRAFT_DATA_DIR=str(tmp_path / "data"), GRAFT_LOG_FORMAT="json")
    done = subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(line["msg"] == "database schema is up to date" for line in logged)
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'graft.db'}")
    with engine.connect() as conn:
        assert set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars()) == schema_heads()
    engine.dispose()


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_serve_never_leaves_its_workers_behind(tmp_path, how):
    """uvicorn re-raises the SIGTERM it handled, which used to kill `graft serve` before it stopped
    its workers; a SIGKILLed serve cannot stop them at all. Either way no worker may outlive it."""
    port = free_port()
    env = venv_env(GRAFT_DATA_DIR=str(tmp_path / "data"), GRAFT_PORT=str(port), GRAFT_WORKERS="1")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
        workers = child_pids(proc.pid)
        assert len(workers) == 1
        proc.send_signal(getattr(signal, how))
        proc.wait(30)
        if how == "SIGTERM":
            assert proc.returncode == 0, log.read_text()[-2000:]
        assert wait_gone(workers, timeout=30) == [], f"orphaned workers: {workers}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in child_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)


# -- the Python client --------------------------------------------------------------------------
def sse(*events: tuple[int, str, dict]) -> bytes:
    """An event stream as GET /v1/jobs/{id}/events writes it."""
    return "".join(f"id: {i}\nevent: {kind}\ndata: {json.dumps(data)}\n\n" for i, kind, data in events).encode()


JOB = {"id": "j1", "dataset_id": "d1", "status": "queued", "config": {"epochs": 2, "strategy": "linear_probe"},
       "priority": 0, "created_at": "2026-01-01T00:00:00Z", "started_at": None, "finished_at": None,
       "attempts": 0, "progress": {}, "model_id": None, "error": None, "cancel_requested": False}
MODEL = {"id": "m1", "job_id": "j1", "dataset_id": "d1", "created_at": "2026-01-01T00:00:00Z",
         "backbone": "efficientnet_lite0", "classes": ["ants", "bees"], "recipe": {"strategy": "linear_probe"},
         "sha256": "0" * 64, "size_bytes": 1,
         "metrics": {"val_accuracy": 0.9, "macro_f1": 0.9, "best_epoch": 2, "device": "cpu",
                     "per_class": {c: {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 5}
                                   for c in ("ants", "bees")},
                     "confusion_matrix": {"labels": ["ants", "bees"], "matrix": [[5, 0], [1, 4]]}}}
STREAM = sse((1, "status", {"status": "queued"}), (2, "status", {"status": "running", "worker_id": "w1"}),
             (3, "epoch", {"epoch": 1, "epochs": 2, "train_loss": 0.7, "val_accuracy": 0.6}),
             (4, "epoch", {"epoch": 2, "epochs": 2, "train_loss": 0.4, "val_accuracy": 0.9}),
             (5, "status", {"status": "succeeded", "model_id": "m1"}))


def fake_api(seen: list[httpx.Request], events: int | bytes = STREAM, final: str = "succeeded"):
    """A Graft API for one job: `events` is the SSE body, or a status code for the events route."""
    polls = {"n": 0}

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path == "/v1/jobs" and request.method == "POST":
            return httpx.Response(202, json=JOB)
        if path == "/v1/jobs/j1/events":
            if isinstance(events, int):
                return httpx.Response(events, json={"detail": "no such route", "code": "not_found"})
            resumed = b"" if request.headers.get("last-event-id") else events  # nothing new after that id
            return httpx.Response(200, content=resumed, headers={"content-type": "text/event-stream"})
        if path == "/v1/jobs/j1":
            polls["n"] += 1
            if polls["n"] < 3 and isinstance(events, int):
                return httpx.Response(200, json={**JOB, "status": "running",
                                                 "progress": {"epoch": polls["n"], "epochs": 2, "val_accuracy": 0.5,
                                                              "train_loss": 0.6, "phase": "training"}})
            done = {**JOB, "status": final, "model_id": "m1" if final == "succeeded" else None}
            if final == "failed":
                done["error"] = {"code": "internal_error", "message": "the worker ran out of memory"}
            return httpx.Response(200, json=done)
        if path == "/v1/models/m1":
            return httpx.Response(200, json=MODEL)
        return httpx.Response(404, json={"detail": f"no such route {path}", "code": "not_found"},
                              headers={"content-type": "application/problem+json"})

    return httpx.MockTransport(handle)


def test_client_sends_the_api_key_and_turns_problems_into_errors(monkeypatch):
    seen: list[httpx.Request] = []
    monkeypatch.setenv("GRAFT_API_KEY", "s3cret")
    monkeypatch.setenv("GRAFT_URL", "http://graft.example:9000/")
    with GraftClient(transport=fake_api(seen)) as client:
        assert client.url == "http://graft.example:9000"
        with pytest.raises(GraftAPIError) as err:
            client.get_model("nope")
    assert err.value.status == 404 and "no such route" in err.value.detail
    assert seen[0].headers["authorization"] == "Bearer s3cret"
    monkeypatch.delenv("GRAFT_API_KEY")
    with GraftClient(transport=fake_api(seen)) as client:
        client.get_job("j1")
    assert "authorization" not in seen[-1].headers


def test_watch_follows_the_event_stream_and_falls_back_to_polling():
    seen: list[httpx.Request] = []
    with GraftClient("http://x", transport=fake_api(seen)) as client:
        events = list(client.watch_job("j1"))
    assert [e["kind"] for e in events] == ["status", "status", "epoch", "epoch", "status"]
    assert events[3]["data"]["val_accuracy"] == 0.9 and events[-1]["data"]["model_id"] == "m1"
    assert seen[0].headers["accept"] == "text/event-stream"

    seen.clear()
    with GraftClient("http://x", transport=fake_api(seen, events=404), poll_interval_s=0.01) as client:
        events = list(client.watch_job("j1"))
    assert [e["kind"] for e in events if e["kind"] == "epoch"] == ["epoch", "epoch"]
    assert events[-1] == {"id": None, "kind": "status", "data": {"status": "succeeded", "model_id": "m1"},
                          "created_at": None}

    # A stream that ends early (a proxy timeout) is resumed after the last event it delivered.
    seen.clear()
    cut = sse((1, "status", {"status": "running"}))
    with GraftClient("http://x", transport=fake_api(seen, events=cut), poll_interval_s=0.01) as client:
        gen = client.watch_job("j1")
        assert next(gen)["data"]["status"] == "running"
        assert next(gen)["data"]["status"] == "succeeded"  # the job ended meanwhile
    resumed = [r for r in seen if r.url.path.endswith("/events")][1]
    assert resumed.headers["last-event-id"] == "1" and seen[-1].url.path == "/v1/jobs/j1"


def test_sse_parser_handles_comments_multiline_data_and_whole_event_payloads():
    lines = [": keep-alive", "", "id: 7", "event: warning", "data: {\"message\":", "data:  \"slow\"}", "",
             "data: {\"id\": 8, \"kind\": \"epoch\", \"data\": {\"epoch\": 1}, \"created_at\": \"t\"}"]
    events = list(parse_sse(iter(lines)))
    assert events[0] == {"id": "7", "kind": "warning", "data": {"message": "slow"}, "created_at": None}
    assert events[1] == {"id": 8, "kind": "epoch", "data": {"epoch": 1}, "created_at": "t"}


def test_train_watch_shows_progress_then_a_metrics_table(capsys, monkeypatch):
    seen: list[httpx.Request] = []
    monkeypatch.setattr(cli_commands, "GraftClient", lambda url, key: GraftClient(url, key, transport=fake_api(seen)))
    code, out, err = graft(capsys, monkeypatch, "train", "d1", "--epochs", "2", "--image-size", "96", "--watch")
    assert code == 0, err
    assert json.loads(seen[0].content) == {"dataset_id": "d1", "epochs": 2, "image_size": 96}
    assert "2/2" in err and "val_acc 0.900" in err  # the progress bar's last frame
    assert "val_accuracy" in out and "0.9000" in out and "confusion matrix" in out and "per class" in out

    monkeypatch.setattr(cli_commands, "GraftClient",
                        lambda url, key: GraftClient(url, key, transport=fake_api(seen, events=404, final="failed"),
                                                     poll_interval_s=0.01))
    code, out, err = graft(capsys, monkeypatch, "train", "d1", "--watch")
    assert code == 1 and "failed" in err and "ran out of memory" in err


# -- the client commands against a live API -----------------------------------------------------
@pytest.fixture
def live(settings):
    with uvicorn_thread(create_app(settings)) as url:
        yield url


def test_upload_a_folder_zips_it_on_the_fly_and_prints_the_report(capsys, monkeypatch, live, tmp_path):
    folder = dataset_folder(tmp_path / "bugs", per_class_train=6, per_class_val=3)
    code, out, err = graft(capsys, monkeypatch, "datasets", "upload", str(folder), GRAFT_URL=live)
    assert code == 0, err
    assert "dataset bugs" in out and "ants" in out and "bees" in out
    assert "2 file(s) skipped" in out and "train/ants/notes.txt" in out and "train/bees/broken.jpg" in out
    assert "uploaded" in err  # the progress bars

    code, out, _ = graft(capsys, monkeypatch, "datasets", "list", "--json", GRAFT_URL=live)
    [dataset] = json.loads(out)
    assert dataset["name"] == "bugs" and dataset["split_counts"]["train"] == {"ants": 6, "bees": 6}

    (tmp_path / "bugs.zip").write_bytes(subset_zip(4, 2))
    code, out, _ = graft(capsys, monkeypatch, "datasets", "upload", str(tmp_path / "bugs.zip"), "--name", "zipped",
                         "--json", GRAFT_URL=live)
    assert code == 0 and json.loads(out)["name"] == "zipped" and json.loads(out)["num_images"] == 12


def test_zip_folder_keeps_relative_paths(tmp_path):
    folder = dataset_folder(tmp_path / "f", per_class_train=1, per_class_val=1, junk=False)
    with open(tmp_path / "out.zip", "wb") as f:
        assert zip_folder(folder, f) == 4
    names = zipfile.ZipFile(tmp_path / "out.zip").namelist()
    assert all(n.split("/")[0] in ("train", "val") for n in names) and len(names) == 4


def test_errors_are_one_line_messages_with_an_exit_code(capsys, monkeypatch, live, tmp_path):
    code, _, err = graft(capsys, monkeypatch, "models", "show", "nope", GRAFT_URL=live)
    assert code == 1 and "error 404" in err and "no model with id 'nope'" in err and "Traceback" not in err
    code, _, err = graft(capsys, monkeypatch, "train", "nope", "--strategy", "magic", GRAFT_URL=live)
    assert code == 1 and "error 422" in err and "strategy" in err
    code, _, err = graft(capsys, monkeypatch, "models", "list", GRAFT_URL=f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "cannot reach Graft" in err and "GRAFT_URL" in err
    code, _, err = graft(capsys, monkeypatch, "predict", "m1", str(tmp_path / "missing.jpg"), GRAFT_URL=live)
    assert code == 2 and "does not exist" in err


def test_watching_a_job_does_not_lock_out_other_writers(settings):
    """On SQLite a transaction holds the database's write lock: an event stream that kept one open
    for its whole life stalled every heartbeat and upload while someone watched a job."""
    import threading

    with uvicorn_thread(create_app(settings)) as url, GraftClient(url, timeout=10) as client:
        dataset = httpx.post(f"{url}/v1/datasets", files={"file": ("d.zip", subset_zip(5, 2))}, timeout=30).json()
        job = client.create_job(dataset["id"])  # no worker here: it stays queued, the stream stays open
        watching = threading.Thread(target=lambda: list(client.watch_job(job["id"], timeout_s=15)), daemon=True)
        watching.start()
        time.sleep(1.0)
        started = time.monotonic()
        resp = httpx.post(f"{url}/v1/jobs", json={"dataset_id": dataset["id"]}, timeout=8)
        assert resp.status_code == 202 and time.monotonic() - started < 3
        client.cancel_job(job["id"])  # ends the stream
        watching.join(20)


def test_train_watch_in_a_pipe_shows_each_phase_counting_before_the_job_ends(settings):
    """`graft train --watch` whose output is a pipe (a log, CI) prints a line per progress event:
    a phase's count is on screen while the job still runs, then the same tables as ever."""
    import re
    import threading
    from datetime import datetime, timezone

    from workers.worker import Worker

    with uvicorn_thread(create_app(settings)) as url:
        dataset = httpx.post(f"{url}/v1/datasets", files={"file": ("d.zip", subset_zip(6, 3))}, timeout=60).json()
        worker = threading.Thread(target=Worker(settings).run, kwargs={"max_jobs": 1}, daemon=True)
        worker.start()
        cli_proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "train", dataset["id"], "--watch", "--strategy", "fine_tune",
             "--epochs", "2", "--image-size", "64", "--batch-size", "4"],
            env=venv_env(GRAFT_URL=url), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[tuple[float, str]] = []  # (when it was read, the line)
        reader = threading.Thread(target=lambda: lines.extend((time.time(), line.rstrip()) for line in cli_proc.stderr),
                                  daemon=True)
        reader.start()
        stdout = cli_proc.stdout.read()
        cli_proc.wait(240)
        reader.join(10)
        worker.join(60)
        job_id = next(m.group(1) for _, line in lines if (m := re.match(r"job (\w+) queued", line)))
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
    assert cli_proc.returncode == 0, lines
    ended = datetime.fromisoformat(job["finished_at"])
    ended = (ended if ended.tzinfo else ended.replace(tzinfo=timezone.utc)).timestamp()
    text = "\n".join(line for _, line in lines)
    counting = [(at, line) for at, line in lines if re.search(r"\b[1-9][\d,]*/[\d,]+ images\b", line)]
    assert counting and counting[0][0] < ended, text  # seen while the job ran
    train, total = 12, 12 + 6
    assert f"decoding images  {total}/{total} images" in text and f"training  {2 * train}/{2 * train} images" in text
    assert text.index("decoding images") < text.index("training") < text.index("job succeeded")
    assert "epoch 2/2" in text
    assert "val_accuracy" in stdout and "per class" in stdout and "confusion matrix" in stdout
