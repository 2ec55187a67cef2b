"""Webhooks for real: a worker's job end reaches a receiver on loopback, signed; slow, failing and
redirecting receivers are retried or refused without touching the job; inside addresses are
refused before any connection; one project never sees another's webhooks."""
from __future__ import annotations

import itertools
import json
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.api.auth import create_key, create_project
from service.app import create_app
from service.store.db import Database
from service.store.queue import JobQueue
from service.store.tables import WebhookDelivery
from service.webhooks import store
from service.webhooks.delivery import Outcome
from service.webhooks.outbox import enqueue_event
from service.webhooks.signing import SIGNATURE_HEADER, sign, verify_signature
from tests.support.data import subset_zip
from workers.worker import Worker

TINY_PROBE = {"strategy": "linear_probe", "image_size": 32, "epochs": 1}
FAST = {"webhook_poll_s": 0.05, "webhook_backoff_s": 0.1, "webhook_timeout_s": 0.5, "webhook_max_attempts": 3,
        "min_images_per_class": 2}


class Receiver:
    """An HTTP server on a loopback address that records every request. Paths choose the answer:
    /ok 200, /fail 500, /slow answers after 1.5 s, /redirect?to=URL 302 to URL."""

    def __init__(self, host: str = "127.0.0.1"):
        self.requests: list[dict] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.arrived:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                              "at": time.time()})
                    receiver.arrived.notify_all()
                if self.path.startswith("/slow"):
                    time.sleep(1.5)
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("to=", 1)[1])
                else:
                    self.send_response(500 if self.path.startswith("/fail") else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"

    def wait_for(self, path: str, n: int = 1, timeout: float = 20) -> list[dict]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.on(path)) >= n, timeout)
        return self.on(path)

    def on(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"].startswith(path)]


@contextmanager
def receiving(host: str = "127.0.0.1") -> Iterator[Receiver]:
    receiver = Receiver(host)
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as r:
        yield r


def hook(client: TestClient, url: str, events: list[str], headers: dict | None = None) -> dict:
    resp = client.post("/v1/webhooks", json={"url": url, "events": events}, headers=headers or {})
    assert resp.status_code == 201, resp.text
    return resp.json()


def wait_settled(client: TestClient, webhook_id: str, timeout: float = 20, headers: dict | None = None) -> list[dict]:
    """Until every delivery of the webhook has succeeded or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deliveries = client.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=headers or {}).json()
        if deliveries and all(d["status"] != "pending" for d in deliveries):
            return deliveries
        time.sleep(0.05)
    raise AssertionError(f"deliveries of {webhook_id} still pending after {timeout}s: {deliveries}")


def at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_real_job_end_is_delivered_signed_and_bad_receivers_are_retried_without_touching_the_job(
        settings, receiver):
    s = settings.model_copy(update={"webhook_allow_private": True, **FAST})
    with TestClient(create_app(s)) as client:
        good = hook(client, receiver.url + "/ok", ["job.succeeded", "job.failed"])
        failing = hook(client, receiver.url + "/fail", ["job.succeeded"])
        slow = hook(client, receiver.url + "/slow", ["job.succeeded"])
        hook(client, receiver.url + "/cancelled-only", ["job.cancelled"])
        assert good["secret"].startswith("whsec_") and "secret" not in client.get(f"/v1/webhooks/{good['id']}").json()

        dataset = client.post("/v1/datasets", files={"file": ("bugs.zip", subset_zip(2, 1))}).json()
        job_id = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **TINY_PROBE}).json()["id"]
        Worker(s.model_copy(update={"worker_device": "cpu", "torch_threads": 1})).run(max_jobs=1)
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job

        (request,) = receiver.wait_for("/ok", timeout=5)
        assert request["at"] - at(job["finished_at"]) < 3  # the 1 s target, with room for a busy machine
        event = json.loads(request["body"])
        assert (event["event"], event["project_id"]) == ("job.succeeded", "default")
        assert event["data"]["job_id"] == job_id and event["data"]["model_id"] == job["model_id"]
        header = request["headers"][SIGNATURE_HEADER]
        assert verify_signature(good["secret"], header, request["body"])
        assert not verify_signature(good["secret"], header, request["body"].replace(b"succeeded", b"failed"))
        assert not verify_signature(failing["secret"], header, request["body"])  # another webhook's secret
        stale = sign(good["secret"], request["body"], timestamp=int(time.time()) - 600)
        assert not verify_signature(good["secret"], stale, request["body"], tolerance_s=300)
        assert request["headers"]["Graft-Event"] == "job.succeeded"

        # 500: three attempts with growing waits, then failed; each logged with its status code.
        (delivery,) = wait_settled(client, failing["id"])
        assert delivery["status"] == "failed"
        tries = delivery["attempts"]
        assert [a["status_code"] for a in tries] == [500, 500, 500] and len(receiver.on("/fail")) == 3
        assert all(a["next_retry_at"] for a in tries[:-1]) and tries[-1]["next_retry_at"] is None
        gaps = [at(b["started_at"]) - at(a["started_at"]) for a, b in itertools.pairwise(tries)]
        assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # base 0.1 s, doubled, jitter in [half, all]
        # A receiver slower than the timeout: the attempt ends at the timeout, is retried, then fails.
        (delivery,) = wait_settled(client, slow["id"])
        assert delivery["status"] == "failed" and len(delivery["attempts"]) == 3
        assert all("timed out" in a["error"] and a["duration_ms"] < 1400 for a in delivery["attempts"])

        assert receiver.on("/cancelled-only") == []  # not subscribed to job.succeeded
        (ok,) = client.get(f"/v1/webhooks/{good['id']}/deliveries").json()
        assert ok["status"] == "succeeded" and ok["attempts"][0]["status_code"] == 200
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"  # the job's outcome never changed


def test_cancelled_and_failed_jobs_send_their_events(settings, receiver):
    s = settings.model_copy(update={"webhook_allow_private": True, **FAST})
    with TestClient(create_app(s)) as client:
        hook(client, receiver.url + "/ends", ["job.cancelled", "job.failed"])
        dataset = client.post("/v1/datasets", files={"file": ("bugs.zip", subset_zip(2, 1))}).json()
        cancelled = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **TINY_PROBE}).json()["id"]
        assert client.post(f"/v1/jobs/{cancelled}/cancel").status_code in (200, 202)
        failing = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **TINY_PROBE}).json()["id"]
        queue: JobQueue = client.app.state.queue
        claim = queue.claim("test-worker")
        assert claim.job_id == failing
        assert queue.fail(claim, "bad_data", "no images", retryable=False) == "failed"
        events = [json.loads(r["body"]) for r in receiver.wait_for("/ends", 2, timeout=5)]
        assert sorted((e["event"], e["data"]["job_id"]) for e in events) == sorted(
            [("job.cancelled", cancelled), ("job.failed", failing)])
        assert next(e for e in events if e["event"] == "job.failed")["data"]["error_code"] == "bad_data"


def test_inside_addresses_are_refused_at_registration_and_after_a_redirect_before_connecting(settings, receiver,
                                                                                          caplog):
    # Only the receiver's own address is allowed: every other inside address stays refused.
    s = settings.model_copy(update={"webhook_allowed_networks": ["127.0.0.1/32"], **FAST})
    with receiving("127.0.0.2") as elsewhere, TestClient(create_app(s)) as client:
        for url in ("http://127.0.0.2/x", "http://10.1.2.3/x", "http://169.254.169.254/latest", "http://[::1]:80/",
                    "https://[fe80::1]/", "http://0.0.0.0/", "http://[::ffff:10.0.0.1]/"):
            resp = client.post("/v1/webhooks", json={"url": url, "events": ["job.failed"]})
            assert resp.status_code == 422, (url, resp.text)
            assert "public addresses only" in resp.json()["detail"]
        redirected = {target: hook(client, f"{receiver.url}/redirect?to={target}", ["alias.moved"])
                      for target in (elsewhere.url + "/inside", "http://10.1.2.3/x", "http://[::1]:9/", "ftp://a/")}
        with client.app.state.db.session() as session:
            enqueue_event(session, "default", "alias.moved", {"alias": "prod"})
        for target, webhook in redirected.items():
            (delivery,) = wait_settled(client, webhook["id"])
            (attempt,) = delivery["attempts"]  # a refusal is final: no retry
            assert delivery["status"] == "failed" and attempt["error"].startswith("refused"), (target, attempt)
            assert attempt["status_code"] == 302 or "resolves to" in attempt["error"]
        assert elsewhere.requests == []  # 127.0.0.2 was never connected to
        refusals = [r for r in caplog.records if r.name == "graft.webhooks" and "refused" in r.getMessage()]
        assert len(refusals) == len(redirected)


@pytest.mark.parametrize("body, complaint", [
    ({"url": "ftp://example.com/x", "events": ["job.failed"]}, "http:// or https://"),
    ({"url": "example.com/hook", "events": ["job.failed"]}, "http:// or https://"),
    ({"url": "https://example.com/x", "events": ["job.done"]},
     "'job.succeeded', 'job.failed', 'job.cancelled' or 'alias.moved'"),
    ({"url": "https://example.com/x", "events": []}, "at least 1"),
    ({"url": "http://localhost:8080/x", "events": ["job.failed"]}, "is a loopback address"),
    ({"url": "http://127.0.0.1/", "events": ["job.failed"]}, "public addresses only"),
])
def test_bad_registrations_say_what_is_allowed(settings, body, complaint):
    with TestClient(create_app(settings)) as client:
        resp = client.post("/v1/webhooks", json=body)
        assert resp.status_code == 422 and resp.headers["content-type"] == "application/problem+json"
        assert complaint in resp.json()["detail"], resp.json()
        assert client.get("/v1/webhooks").json() == []


def test_another_projects_webhooks_are_not_found(settings):
    s = settings.model_copy(update={"auth_required": True, "webhook_allow_private": True})
    db = Database(s.database_url)
    with db.session() as session:
        keys = {}
        for name in ("alpha", "beta"):
            project = create_project(session, name)
            keys[name] = {"Authorization": f"Bearer {create_key(session, project.id, 'admin', 'admin')[1]}"}
    db.dispose()
    with TestClient(create_app(s)) as client:
        mine = hook(client, "http://127.0.0.1:9/a", ["job.failed"], headers=keys["alpha"])
        assert [h["id"] for h in client.get("/v1/webhooks", headers=keys["alpha"]).json()] == [mine["id"]]
        assert client.get("/v1/webhooks", headers=keys["beta"]).json() == []
        for method, path in (("GET", ""), ("GET", "/deliveries"), ("DELETE", "")):
            resp = client.request(method, f"/v1/webhooks/{mine['id']}{path}", headers=keys["beta"])
            assert resp.status_code == 404, (method, path, resp.text)
        assert client.delete(f"/v1/webhooks/{mine['id']}", headers=keys["alpha"]).status_code == 204
        assert client.get(f"/v1/webhooks/{mine['id']}", headers=keys["alpha"]).status_code == 404


def test_two_dispatchers_never_claim_one_delivery(any_db_settings):
    """API replicas share the outbox: concurrent claims split the due deliveries, none twice."""
    db = Database(any_db_settings.database_url)
    try:
        with db.session() as session:
            webhook_id = store.create_webhook(session, "default", "http://127.0.0.1:9/", ["alias.moved"]).id
            for n in range(40):
                enqueue_event(session, "default", "alias.moved", {"n": n})
        claimed: list[list[str]] = [[], [], [], []]

        def claim_all(mine: list[str]) -> None:
            while batch := store.claim_due(db, 3, lease_s=60):
                mine.extend(c.id for c in batch)

        threads = [threading.Thread(target=claim_all, args=(mine,)) for mine in claimed]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        everyone = [d for mine in claimed for d in mine]
        assert len(everyone) == len(set(everyone)) == 40
        assert store.claim_due(db, 10, lease_s=60) == []  # claimed ones are not due again until the lease ends

        # Deleting the webhook drops its deliveries; a send in flight then records nothing.
        with db.session() as session:
            store.delete_webhook(session, store.webhook_of_project(session, "default", webhook_id))
        claim = store.ClaimedDelivery(everyone[0], "token", webhook_id, "alias.moved", "", "", "{}", 1)
        assert store.record_attempt(db, claim, Outcome(200, None, False, 5), max_attempts=3, backoff_base_s=0,
                                    backoff_cap_s=0) is None
        with db.session(readonly=True) as session:
            assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0
    finally:
        db.dispose()


def test_a_pinned_https_connection_still_checks_the_certificate_against_the_urls_name(tmp_path):
    """Delivery connects to the address it checked, not to the name: TLS must still verify the name."""
    import ipaddress
    import shutil
    import ssl
    import subprocess

    import httpx

    from service.webhooks.delivery import post_pinned

    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=hooks.test", "-addext", "subjectAltName=DNS:hooks.test"],
                   check=True, capture_output=True)
    with receiving() as receiver:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        receiver.server.socket = tls.wrap_socket(receiver.server.socket, server_side=True)
        port = receiver.server.server_address[1]
        loopback = [ipaddress.ip_address("127.0.0.1")]
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), trust_env=False) as client:
            ok = post_pinned(client, httpx.URL(f"https://hooks.test:{port}/ok"), loopback, b"{}", {}, 2)
            with pytest.raises(httpx.ConnectError, match="Hostname mismatch"):
                post_pinned(client, httpx.URL(f"https://elsewhere.test:{port}/ok"), loopback, b"{}", {}, 2)
        assert ok.status_code == 200 and receiver.on("/ok")[0]["headers"]["Host"] == f"hooks.test:{port}"
