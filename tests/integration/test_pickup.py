"""Job pickup: an idle worker is woken by the commit that makes a job claimable (PostgreSQL:
LISTEN/NOTIFY; SQLite: a FIFO next to the database), not by its next poll; a rolled-back submit
wakes nobody; and a lost wake-up never strands a job, because the poll stays as the safety net.

Workers here poll every 30 s with a 60 s heartbeat, so anything picked up within seconds was
picked up by a wake-up."""
from __future__ import annotations

import signal
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, func, select, text

from service.store.db import utcnow
from service.store.migrate import upgrade
from service.store.queue import JobQueue
from service.settings import Settings
from service.store.tables import Job, WorkerRecord
from service.store.wakeups import LISTENER_NAME, JobWaiter
from tests.integration.test_queue import cancel, claim_one, enqueue, job_row, silence
from tests.integration.test_queue import queue  # noqa: F401  (fixture)
from tests.integration.test_worker_pool import TINY_JOB, submit, wait_status
from tests.integration.test_worker_pool import api, dataset_id, db, workers  # noqa: F401  (fixtures)
from workers.worker import Worker

SLOW_POLL = {"GRAFT_POLL_INTERVAL_S": "30", "GRAFT_HEARTBEAT_INTERVAL_S": "60"}
PROMPT_S = 5.0  # generous for a wake-up on a loaded 2-core machine; a poll would take 30 s


@pytest.fixture(params=["sqlite", "postgres"])
def pool_settings(request, tmp_path) -> Settings:
    """test_worker_pool's fixtures (api, uploaded dataset, worker processes) on either database."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""
    s = Settings(data_dir=tmp_path / "data", database_url=url, poll_interval_s=30, heartbeat_interval_s=60,
                 retry_backoff_s=0, reaper_in_api=False, max_concurrent_jobs=0, min_images_per_class=2)
    s.ensure_dirs()
    upgrade(s.database_url)
    return s


@pytest.fixture
def waiter(db):
    w = JobWaiter(db, reconnect_s=0.2)
    yield w
    w.close()


def running_workers(db) -> int:
    """Workers registered and not marked stopped."""
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(WorkerRecord).where(WorkerRecord.stopped_at.is_(None)))


def wait_worker_idle(db, timeout: float = 120) -> None:
    """Until a worker has registered, plus a moment: it has made its first claim and waits."""
    deadline = time.monotonic() + timeout
    while not running_workers(db):
        assert time.monotonic() < deadline, "no worker started"
        time.sleep(0.1)
    time.sleep(1.0)


def wait_worker_stopped(db, timeout: float) -> float:
    """The monotonic time at which no worker is registered as running any more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running_workers(db):
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"the worker did not stop within {timeout}s")


def pickup_s(api, job_id: str, timeout: float = 60) -> float:
    """Seconds from now until the job leaves `queued`."""
    start = time.monotonic()
    wait_status(api, job_id, ("running", "succeeded", "failed"), timeout=timeout)
    return time.monotonic() - start


# -- the wake-up signal ----------------------------------------------------------------------
def test_only_a_committed_submit_wakes_a_waiter(db, dataset_id, waiter):
    with pytest.raises(RuntimeError), db.session() as s:
        JobQueue.enqueue(s, dataset_id=dataset_id, config={}, max_attempts=1)
        s.flush()
        raise RuntimeError("the request failed after the job was added")
    assert waiter.wait(1.0) is False  # rolled back: nobody woken

    with db.session() as s:
        job_id = JobQueue.enqueue(s, dataset_id=dataset_id, config={}, max_attempts=1).id
        s.flush()
        assert waiter.wait(1.0) is False  # not before the commit: a woken worker would find nothing
    assert waiter.wait(PROMPT_S) is True
    with db.session() as s:
        assert s.scalars(select(Job.id)).all() == [job_id]


def test_every_way_back_to_the_queue_wakes_waiters_and_cancel_does_not(db, queue, dataset_id, waiter):  # noqa: F811
    job_id = enqueue(db, dataset_id, max_attempts=5)
    assert waiter.wait(PROMPT_S)

    claim = claim_one(queue, job_id)
    assert queue.fail(claim, "internal_error", "flaky", retryable=True) == "queued"
    assert waiter.wait(PROMPT_S), "a retry"

    assert queue.release(claim_one(queue, job_id))
    assert waiter.wait(PROMPT_S), "a job handed back on shutdown"

    claim_one(queue, job_id)
    silence(db, job_id)
    assert queue.requeue_stale() == [job_id]
    assert waiter.wait(PROMPT_S), "a stalled job re-queued"

    claim_one(queue, job_id)
    cancel(db, job_id)  # running: asks the worker to stop
    assert waiter.wait(1.0) is False
    other = enqueue(db, dataset_id)
    assert waiter.wait(PROMPT_S)
    cancel(db, other)  # queued: cancelled at once
    assert waiter.wait(1.0) is False
    assert job_row(db, other).status == "cancelled"


# -- a real worker ---------------------------------------------------------------------------
def test_a_waiting_worker_process_picks_up_a_submitted_job_at_once(api, db, dataset_id, workers):  # noqa: F811
    """`graft worker` as `graft serve` runs it: its own process, the job submitted over HTTP."""
    proc = workers.start(**SLOW_POLL)
    wait_worker_idle(db)
    job_id = submit(api, dataset_id, **TINY_JOB)
    took = pickup_s(api, job_id)
    assert took < PROMPT_S, f"picked up after {took:.1f}s"

    assert wait_status(api, job_id, ("succeeded", "failed"))["status"] == "succeeded"
    time.sleep(0.5)  # idle again, waiting
    asked = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # The worker stops waiting at once and says so in the registry; the interpreter's own exit
    # (torch's teardown) is not the wait this test is about, so it only has to end, and cleanly.
    stopped = wait_worker_stopped(db, timeout=30)
    log = (workers.log_dir / "worker-0.log").read_text(errors="replace")[-2000:]
    assert stopped - asked < PROMPT_S, f"SIGTERM waited {stopped - asked:.1f}s (the poll is 30 s):\n{log}"
    assert proc.wait(30) == 0, log


def test_an_idle_worker_wakes_for_a_job_and_stops_at_once_on_shutdown(api, db, dataset_id, pool_settings):  # noqa: F811
    worker = Worker(pool_settings)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_worker_idle(db)
        job_id = submit(api, dataset_id, **TINY_JOB)
        assert pickup_s(api, job_id) < PROMPT_S
        assert wait_status(api, job_id, ("succeeded", "failed"))["status"] == "succeeded"
        time.sleep(0.5)  # idle again, waiting
    finally:
        asked = time.monotonic()
        worker.request_shutdown()
        thread.join(20)
    assert not thread.is_alive() and time.monotonic() - asked < 2.0, "shutdown waited for the poll"


def test_a_retry_runs_when_its_backoff_ends_not_at_the_next_poll(api, db, dataset_id, pool_settings):  # noqa: F811
    worker = Worker(pool_settings)
    thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 1}, daemon=True)
    thread.start()
    try:
        wait_worker_idle(db)
        with db.session() as s:  # as a retry is queued: claimable only after its backoff
            job = JobQueue.enqueue(s, dataset_id=dataset_id, config=TINY_JOB, max_attempts=1)
            job.run_after = due = utcnow() + timedelta(seconds=2)
            job_id = job.id
        wait_status(api, job_id, ("running", "succeeded", "failed"), timeout=60)
        started = job_row(db, job_id).started_at
        assert due <= started < due + timedelta(seconds=PROMPT_S), (due, started)
    finally:
        worker.request_shutdown()
        worker.request_shutdown()
        thread.join(60)


# -- PostgreSQL: the listening connection drops ----------------------------------------------
def kill_listener(db) -> None:
    """Terminate the worker's LISTEN connection, as a server restart or a network cut would."""
    engine = create_engine(db.url, isolation_level="AUTOCOMMIT")  # pg_stat_activity is fixed within a transaction
    try:
        with engine.connect() as conn:
            deadline = time.monotonic() + 60
            query = text("SELECT pid FROM pg_stat_activity WHERE application_name = :name "
                         "AND datname = current_database()")
            while not (pids := conn.execute(query, {"name": LISTENER_NAME}).scalars().all()):
                assert time.monotonic() < deadline, "the worker never listened"
                time.sleep(0.1)
            for pid in pids:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            while conn.execute(query, {"name": LISTENER_NAME}).first():  # gone: nobody hears NOTIFY now
                time.sleep(0.05)
    finally:
        engine.dispose()


@pytest.mark.parametrize("pool_settings", ["postgres"], indirect=True)
def test_a_job_notified_while_the_listener_is_down_is_picked_up_by_the_poll(api, db, dataset_id, workers):  # noqa: F811
    proc = workers.start(GRAFT_POLL_INTERVAL_S="1", GRAFT_HEARTBEAT_INTERVAL_S="60", GRAFT_LISTEN_RETRY_S="600")
    wait_worker_idle(db)
    kill_listener(db)
    took = pickup_s(api, submit(api, dataset_id, **TINY_JOB))
    assert took < PROMPT_S, f"picked up after {took:.1f}s"
    assert proc.poll() is None
    assert "lost the job notification connection" in (workers.log_dir / "worker-0.log").read_text()


@pytest.mark.parametrize("pool_settings", ["postgres"], indirect=True)
def test_the_listener_reconnects_and_looks_for_jobs_it_missed(api, db, dataset_id, workers):  # noqa: F811
    workers.start(GRAFT_LISTEN_RETRY_S="1", **SLOW_POLL)
    wait_worker_idle(db)
    kill_listener(db)
    missed = submit(api, dataset_id, **TINY_JOB)  # its NOTIFY reaches nobody
    assert pickup_s(api, missed) < PROMPT_S  # claimed on reconnecting, not at the next poll
    assert wait_status(api, missed, ("succeeded", "failed"))["status"] == "succeeded"
    time.sleep(1.0)  # idle again, waiting
    took = pickup_s(api, submit(api, dataset_id, **TINY_JOB))
    assert took < PROMPT_S, f"notifications did not come back: picked up after {took:.1f}s"
