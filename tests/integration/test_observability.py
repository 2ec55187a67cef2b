"""Operating Graft: request ids and JSON logs, Prometheus /metrics from the job store, /readyz."""
from __future__ import annotations

import io
import json
import logging
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from service.app import create_app
from service.store.db import Database, utcnow
from service.api.observability import JsonFormatter, RequestIdFilter
from service.settings import Settings
from service.store.tables import Job
from tests.support.data import subset_zip


@pytest.fixture
def client(settings):
    app = create_app(settings)

    @app.get("/test/log")
    def _log_inside_a_route():  # a sync route: runs in the thread pool, away from the middleware
        logging.getLogger("graft.test").info("inside the route", extra={"action": "test"})
        return {}

    @app.get("/test/boom")
    def _boom():
        raise RuntimeError("kaboom")

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def json_log():
    """Records of the graft loggers, formatted as `graft serve` writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("graft")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def metrics_of(client) -> dict[tuple[str, tuple], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def test_every_response_carries_a_request_id_that_every_log_line_repeats(client, json_log):
    fresh = client.get("/test/log")
    request_id = fresh.headers["x-request-id"]
    assert len(request_id) == 32
    assert client.get("/healthz", headers={"X-Request-ID": "lb-7f3a:42"}).headers["x-request-id"] == "lb-7f3a:42"
    odd = client.get("/healthz", headers={"X-Request-ID": "two words\tand a tab"}).headers["x-request-id"]
    assert odd != "two words\tand a tab" and len(odd) == 32  # untrusted ids are replaced, not echoed
    assert client.get("/test/boom").status_code == 500

    lines = json_log()
    inside = next(line for line in lines if line["msg"] == "inside the route")
    assert inside["request_id"] == request_id and inside["action"] == "test" and inside["level"] == "info"
    access = next(line for line in lines if line.get("action") == "http_request" and line["path"] == "/test/log")
    assert access["request_id"] == request_id and access["status"] == 200 and access["duration_ms"] >= 0
    assert access["route"] == "/test/log" and access["method"] == "GET"
    crash = next(line for line in lines if line["msg"] == "unhandled error")
    crash_access = next(line for line in lines
                        if line.get("path") == "/test/boom" and line.get("action") == "http_request")
    assert crash["request_id"] == crash_access["request_id"] and "kaboom" in crash["exc"]
    assert crash_access["status"] == 500


def test_metrics_count_jobs_by_status_queue_depth_and_age_and_durations(client, settings):
    dataset = client.post("/v1/datasets", files={"file": ("d.zip", subset_zip(5, 2))}).json()
    jobs = [client.post("/v1/jobs", json={"dataset_id": dataset["id"]}).json() for _ in range(4)]
    client.post(f"/v1/jobs/{jobs[0]['id']}/cancel")
    db = Database(settings.database_url)
    now = utcnow()
    with db.session() as s:  # time travel: one job waited an hour, one ran for a minute
        s.execute(update(Job).where(Job.id == jobs[1]["id"]).values(created_at=now - timedelta(hours=1)))
        s.execute(update(Job).where(Job.id == jobs[2]["id"]).values(
            status="succeeded", started_at=now - timedelta(seconds=100), finished_at=now - timedelta(seconds=40)))
    db.dispose()
    client.get("/v1/jobs")

    m = metrics_of(client)
    assert m[("graft_jobs", (("status", "queued"),))] == 2
    assert m[("graft_jobs", (("status", "cancelled"),))] == 1
    assert m[("graft_jobs", (("status", "succeeded"),))] == 1
    assert m[("graft_jobs", (("status", "failed"),))] == 0
    assert m[("graft_queue_depth", ())] == 2
    assert 3590 < m[("graft_queue_oldest_age_seconds", ())] < 3700
    ok = (("status", "succeeded"),)
    assert m[("graft_job_duration_seconds_count", ok)] == 1
    assert m[("graft_job_duration_seconds_sum", ok)] == pytest.approx(60, abs=1)
    assert m[("graft_job_duration_seconds_bucket", (("le", "30.0"), *ok))] == 0
    assert m[("graft_job_duration_seconds_bucket", (("le", "60.0"), *ok))] == 1
    assert m[("graft_database_up", ())] == 1 and m[("graft_models_loaded", ())] == 0
    assert m[("graft_http_requests_total", (("method", "GET"), ("route", "/v1/jobs"), ("status", "200")))] == 1
    assert m[("graft_http_requests_total", (("method", "POST"), ("route", "/v1/jobs"), ("status", "202")))] == 4


def test_readyz_checks_the_database_and_the_artifact_store(client, settings):
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["checks"]["database"]["ok"] and body["checks"]["database"]["dialect"] == "sqlite"
    assert body["checks"]["artifact_store"]["ok"] and body["checks"]["artifact_store"]["free_bytes"] > 0

    blobs = settings.blobs_dir
    blobs.rename(blobs.with_name("blobs-away"))
    blobs.write_text("a file where the blob folder should be")
    try:
        broken = client.get("/readyz")
        assert broken.status_code == 503 and broken.headers["content-type"].startswith("application/problem+json")
        assert not broken.json()["checks"]["artifact_store"]["ok"] and broken.json()["checks"]["database"]["ok"]
        assert "artifact_store" in broken.json()["detail"]
    finally:
        blobs.unlink()
        blobs.with_name("blobs-away").rename(blobs)
    assert client.get("/readyz").status_code == 200


def test_readyz_is_503_for_an_unmigrated_or_unreachable_database_and_metrics_still_answer(tmp_path):
    unmigrated = Settings(data_dir=tmp_path / "fresh")
    with TestClient(create_app(unmigrated)) as c:
        resp = c.get("/readyz")
        assert resp.status_code == 503 and "graft migrate" in resp.json()["detail"]
    unreachable = Settings(data_dir=tmp_path / "pg", database_url="postgresql://graft@127.0.0.1:9/graft")
    with TestClient(create_app(unreachable)) as c:
        resp = c.get("/readyz")
        assert resp.status_code == 503 and not resp.json()["checks"]["database"]["ok"]
        m = metrics_of(c)
        assert m[("graft_database_up", ())] == 0 and ("graft_jobs", (("status", "queued"),)) not in m


def test_the_log_handler_follows_stderr_when_the_stream_it_started_on_is_closed(monkeypatch, capsys):
    """`graft serve` run in-process (a test, a CLI runner) swaps sys.stderr for a while; a handler
    bound to that stream failed on every later record with 'I/O operation on closed file'."""
    from service.api.observability import configure_logging

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        swapped = io.StringIO()
        monkeypatch.setattr("sys.stderr", swapped)
        configure_logging("text")
        logging.getLogger("graft.test").info("while swapped")
        swapped.close()
        monkeypatch.undo()
        capsys.readouterr()
        logging.getLogger("graft.test").info("after the swap")
        err = capsys.readouterr().err
        assert "after the swap" in err and "Logging error" not in err
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
