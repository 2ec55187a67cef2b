"""The SQL job queue on SQLite and PostgreSQL: racing workers never run a job twice, stalled
jobs come back (and their old holder can no longer write), retries and cancellation end in the
status a user expects, and jobs run in priority order."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from service.store.db import Database, utcnow
from service.store.queue import Claim, JobQueue, ModelRecord
from service.store.tables import Dataset, Job, Model, new_id

REPO = Path(__file__).resolve().parents[2]
STALE_AFTER_S = 30.0  # small next to the ages set below, large next to a test's own run time


# -- helpers ---------------------------------------------------------------------------------
@pytest.fixture
def queue(db) -> JobQueue:
    return JobQueue(db, stale_after_s=STALE_AFTER_S, retry_backoff_s=0.0)


@pytest.fixture
def dataset_id(db) -> str:
    with db.session() as s:
        ds = Dataset(name="ants-bees", classes=["ants", "bees"], class_counts={"ants": 1, "bees": 1},
                     split_counts={}, num_images=2, has_val_split=False, rejected=[])
        s.add(ds)
        s.flush()
        return ds.id


def enqueue(db: Database, dataset_id: str, *, max_attempts: int = 3, priority: int = 0,
            created_ago_s: float | None = None, config: dict | None = None) -> str:
    with db.session() as s:
        job = JobQueue.enqueue(s, dataset_id=dataset_id, config=config or {"epochs": 1},
                               max_attempts=max_attempts, priority=priority)
        if created_ago_s is not None:
            job.created_at = utcnow() - timedelta(seconds=created_ago_s)
        return job.id


def job_row(db: Database, job_id: str) -> Job:
    with db.session() as s:
        return s.get(Job, job_id)


def models_of(db: Database, job_id: str) -> list[Model]:
    with db.session() as s:
        return list(s.scalars(select(Model).where(Model.job_id == job_id)))


def model_for(claim: Claim) -> ModelRecord:
    """A model as the worker hands it to publish (with its id set, which publish records on the job)."""
    return ModelRecord(id=new_id(), backbone="lite0", classes=["ants", "bees"], metrics={"val_accuracy": 1.0},
                       recipe={}, artifact_dir=f"models/{claim.job_id}", sha256="0" * 64, size_bytes=1)


def silence(db: Database, job_id: str, seconds: float = 10 * STALE_AFTER_S) -> None:
    """The holder's last heartbeat was `seconds` ago, as if its worker had died then."""
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id)
                  .values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def cancel(db: Database, job_id: str) -> None:
    """What POST /v1/jobs/{id}/cancel does."""
    with db.session() as s:
        JobQueue.request_cancel(s, s.get(Job, job_id))


def claim_one(queue: JobQueue, job_id: str, worker: str = "w1") -> Claim:
    claim = queue.claim(worker)
    assert claim is not None and claim.job_id == job_id
    return claim


# -- 1. racing workers -----------------------------------------------------------------------
RACER = textwrap.dedent("""
    import json, sys
    from sqlalchemy import text
    from service.store.db import Database
    from service.store.queue import JobQueue, ModelRecord
    from service.store.tables import new_id

    url, worker_id = sys.argv[1], sys.argv[2]
    db = Database(url)
    queue = JobQueue(db, stale_after_s=3600, retry_backoff_s=0)
    with db.session() as s:  # connect (and import everything) before the start signal
        s.execute(text("SELECT 1"))
    print("ready", flush=True)
    sys.stdin.readline()
    claimed = []
    while (claim := queue.claim(worker_id)) is not None:
        claimed.append([claim.job_id, claim.attempt])
        model = ModelRecord(id=new_id(), backbone="lite0", classes=["a", "b"], metrics={}, recipe={},
                            artifact_dir="models/" + claim.job_id, sha256="0" * 64, size_bytes=1)
        if not queue.publish(claim, model):
            sys.exit("publish failed for " + claim.job_id)
    db.dispose()
    print(json.dumps(claimed), flush=True)
""")


def test_racing_worker_processes_claim_each_job_exactly_once(db, dataset_id):
    job_ids = {enqueue(db, dataset_id) for _ in range(40)}
    workers = [f"racer-{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", RACER, db.url, w], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for w in workers]
    try:
        for p in procs:  # all connected: release them together so their claims overlap
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    claimed = {w: json.loads(out) for w, (out, _) in zip(workers, outputs)}

    all_claims = [job_id for rows in claimed.values() for job_id, _ in rows]
    assert len(all_claims) == len(set(all_claims)) == 40  # nobody claimed a job twice
    assert set(all_claims) == job_ids
    assert all(attempt == 1 for rows in claimed.values() for _, attempt in rows)
    with db.session() as s:
        jobs = {j.id: j for j in s.scalars(select(Job))}
        per_job = dict(s.execute(select(Model.job_id, func.count()).group_by(Model.job_id)).all())
        model_of_job = dict(s.execute(select(Model.job_id, Model.id)).all())
    assert per_job == {job_id: 1 for job_id in job_ids}  # one model per job, none twice
    for worker, rows in claimed.items():
        for job_id, _ in rows:
            job = jobs[job_id]
            assert (job.status, job.attempts, job.worker_id) == ("succeeded", 1, worker)
            assert job.lease_token is None and job.model_id == model_of_job[job_id]


# -- 2. stalled workers ----------------------------------------------------------------------
def test_heartbeat_keeps_a_slow_job_from_being_requeued(db, queue, dataset_id):
    job_id = enqueue(db, dataset_id)
    claim = claim_one(queue, job_id)
    assert queue.requeue_stale() == []  # it just started
    silence(db, job_id)
    assert queue.heartbeat(claim) == "ok"  # renewed in time
    assert queue.requeue_stale() == []
    assert job_row(db, job_id).status == "running"


def test_stale_job_is_requeued_and_its_old_holder_can_no_longer_write(db, queue, dataset_id):
    job_id = enqueue(db, dataset_id, max_attempts=3)
    old = claim_one(queue, job_id, "dead-worker")
    assert queue.report_progress(old, {"phase": "train", "epoch": 1})
    silence(db, job_id)

    assert queue.requeue_stale() == [job_id]
    job = job_row(db, job_id)
    assert (job.status, job.lease_token, job.worker_id, job.error_code) == ("queued", None, None,
                                                                            "worker_lost")

    new = claim_one(queue, job_id, "live-worker")
    assert new.attempt == 2 and new.lease_token != old.lease_token
    assert queue.report_progress(new, {"phase": "train", "epoch": 7})

    # The old holder wakes up: every write it tries is refused and changes nothing.
    assert queue.heartbeat(old) == "lost"
    assert queue.report_progress(old, {"phase": "train", "epoch": 2}) is False
    assert queue.publish(old, model_for(old)) is False
    assert queue.fail(old, "internal_error", "boom", retryable=True) == "lost"
    assert queue.release(old) is False
    assert queue.finish_cancelled(old) is False
    job = job_row(db, job_id)
    assert (job.status, job.worker_id, job.attempts, job.model_id) == ("running", "live-worker", 2, None)
    assert job.lease_token == new.lease_token
    assert job.progress == {"phase": "train", "epoch": 7}
    assert models_of(db, job_id) == []

    # The new holder still owns the job and finishes it.
    assert queue.heartbeat(new) == "ok"
    model = model_for(new)
    assert queue.publish(new, model)
    job = job_row(db, job_id)
    assert (job.status, job.model_id, job.error_code) == ("succeeded", model.id, None)
    assert [m.id for m in models_of(db, job_id)] == [model.id]


# -- 3. attempts run out ---------------------------------------------------------------------
def test_stale_job_out_of_attempts_fails_with_worker_lost(db, queue, dataset_id):
    job_id = enqueue(db, dataset_id, max_attempts=2)
    for attempt in (1, 2):
        claim = claim_one(queue, job_id)
        assert claim.attempt == attempt
        silence(db, job_id)
        assert queue.requeue_stale() == [job_id]

    job = job_row(db, job_id)
    assert (job.status, job.error_code, job.attempts) == ("failed", "worker_lost", 2)
    assert job.finished_at is not None and job.lease_token is None
    assert queue.claim("w2") is None
    assert queue.heartbeat(claim) == "lost"


def test_retryable_failure_retries_until_attempts_run_out(db, queue, dataset_id):
    job_id = enqueue(db, dataset_id, max_attempts=3)
    for attempt, expected in ((1, "queued"), (2, "queued"), (3, "failed")):
        claim = claim_one(queue, job_id)
        assert claim.attempt == attempt
        assert queue.fail(claim, "out_of_memory", f"attempt {attempt} ran out", retryable=True) == expected
        assert job_row(db, job_id).status == expected

    job = job_row(db, job_id)
    assert (job.error_code, job.error_message, job.attempts) == ("out_of_memory", "attempt 3 ran out", 3)
    assert job.finished_at is not None
    assert queue.claim("w1") is None
    assert models_of(db, job_id) == []


def test_retry_waits_for_its_backoff(db, dataset_id):
    queue = JobQueue(db, stale_after_s=STALE_AFTER_S, retry_backoff_s=60.0)
    job_id = enqueue(db, dataset_id, max_attempts=3)
    claim = claim_one(queue, job_id)
    assert queue.fail(claim, "internal_error", "flaky", retryable=True) == "queued"
    job = job_row(db, job_id)
    assert timedelta(seconds=29) < job.run_after - utcnow() <= timedelta(seconds=60)
    assert queue.claim("w1") is None  # not before its backoff is over

    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(run_after=utcnow() - timedelta(seconds=1)))
    assert claim_one(queue, job_id).attempt == 2


def test_non_retryable_failure_fails_at_once(db, queue, dataset_id):
    job_id = enqueue(db, dataset_id, max_attempts=3)
    claim = claim_one(queue, job_id)
    assert queue.fail(claim, "weights_missing", "no weights for lite0", retryable=False) == "failed"
    job = job_row(db, job_id)
    assert (job.status, job.attempts, job.error_code, job.error_message) == (
        "failed", 1, "weights_missing", "no weights for lite0")
    assert job.finished_at is not None and job.lease_token is None
    assert queue.claim("w1") is None


# -- 4. cancellation -------------------------------------------------------------------------
def test_cancel_queued_job_cancels_at_once_and_it_never_runs(db, queue, dataset_id):
    job_id = enqueue(db, dataset_id)
    cancel(db, job_id)
    job = job_row(db, job_id)
    assert (job.status, job.attempts) == ("cancelled", 0)
    assert job.finished_at is not None
    assert queue.claim("w1") is None


def test_cancel_running_job_stops_it_at_its_next_heartbeat(db, queue, dataset_id):
    job_id = enqueue(db, dataset_id)
    claim = claim_one(queue, job_id)
    assert queue.heartbeat(claim) == "ok"
    cancel(db, job_id)
    assert job_row(db, job_id).status == "running"  # the worker decides when to stop
    assert queue.heartbeat(claim) == "cancel"

    assert queue.finish_cancelled(claim)
    job = job_row(db, job_id)
    assert (job.status, job.lease_token, job.model_id) == ("cancelled", None, None)
    assert job.finished_at is not None
    assert queue.publish(claim, model_for(claim)) is False  # too late to publish now
    assert models_of(db, job_id) == []
    assert queue.claim("w1") is None


def test_cancelled_job_whose_worker_died_ends_cancelled(db, queue, dataset_id):
    job_id = enqueue(db, dataset_id, max_attempts=3)
    claim_one(queue, job_id)
    cancel(db, job_id)
    silence(db, job_id)  # the worker died before it saw the cancel request
    assert queue.requeue_stale() == [job_id]
    job = job_row(db, job_id)
    assert (job.status, job.lease_token) == ("cancelled", None)
    assert job.finished_at is not None
    assert queue.claim("w2") is None  # it does not run again


def test_cancel_of_a_finished_job_changes_nothing(db, queue, dataset_id):
    job_id = enqueue(db, dataset_id)
    claim = claim_one(queue, job_id)
    assert queue.publish(claim, model_for(claim))
    cancel(db, job_id)
    job = job_row(db, job_id)
    assert (job.status, job.cancel_requested) == ("succeeded", False)


def test_cancel_decides_on_the_jobs_current_status(db, queue, dataset_id):
    """The API loaded the job while it was queued; a worker claimed it (or even finished it)
    before the cancel was written. The cancel must not overwrite what the worker did."""
    if not db.is_postgres:
        pytest.skip("SQLite: the API's transaction holds the write lock from its first read "
                    "(BEGIN IMMEDIATE), so no worker can claim in between")
    running, finished = enqueue(db, dataset_id, created_ago_s=2), enqueue(db, dataset_id, created_ago_s=1)
    with db.session() as api:
        loaded = [api.get(Job, running), api.get(Job, finished)]
        assert [j.status for j in loaded] == ["queued", "queued"]
        claim = claim_one(queue, running, "w1")
        done = claim_one(queue, finished, "w2")
        assert queue.publish(done, model_for(done))
        for job in loaded:
            JobQueue.request_cancel(api, job)

    job = job_row(db, running)
    assert (job.status, job.cancel_requested) == ("running", True)
    assert queue.heartbeat(claim) == "cancel"
    job = job_row(db, finished)
    assert job.status == "succeeded" and len(models_of(db, finished)) == 1


# -- 5. order --------------------------------------------------------------------------------
def test_lower_priority_value_runs_first_then_oldest_first(db, queue, dataset_id):
    later = enqueue(db, dataset_id, priority=5, created_ago_s=100)
    newer = enqueue(db, dataset_id, priority=0, created_ago_s=10)
    older = enqueue(db, dataset_id, priority=0, created_ago_s=50)
    urgent = enqueue(db, dataset_id, priority=-1, created_ago_s=1)
    order = [queue.claim("w1").job_id for _ in range(4)]
    assert order == [urgent, older, newer, later]
    assert queue.claim("w1") is None


# -- 6. graceful shutdown --------------------------------------------------------------------
def test_release_requeues_without_counting_the_attempt(db, queue, dataset_id):
    job_id = enqueue(db, dataset_id, max_attempts=1)
    claim = claim_one(queue, job_id)
    assert queue.report_progress(claim, {"phase": "train", "epoch": 3})
    assert queue.release(claim)
    job = job_row(db, job_id)
    assert (job.status, job.attempts, job.lease_token, job.worker_id) == ("queued", 0, None, None)
    assert queue.heartbeat(claim) == "lost"
    assert queue.release(claim) is False  # a second release does not un-count anything

    again = claim_one(queue, job_id, "w2")
    assert again.attempt == 1  # its only attempt is still there
    assert queue.publish(again, model_for(again))
    job = job_row(db, job_id)
    assert (job.status, job.attempts, job.worker_id) == ("succeeded", 1, "w2")
