"""The job queue: every SQL statement about a job's life lives here.

A job is a row. Workers claim atomically (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: the whole
database is locked for the claiming transaction, so the status='queued' re-check cannot pass for
two workers). Each claim gets a fresh lease token, and every later write by a worker is
conditional on still holding it, so a worker that lost its lease changes nothing.
"""
from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, select, update

from service.db import Database, utcnow
from service.tables import Job, Model, new_id

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


@dataclass(frozen=True)
class Claim:
    job_id: str
    lease_token: str
    dataset_id: str
    config: dict
    attempt: int


class JobQueue:
    def __init__(self, db: Database, *, stale_after_s: float, retry_backoff_s: float = 2.0):
        self.db = db
        self.stale_after_s = stale_after_s
        self.retry_backoff_s = retry_backoff_s

    # -- API side ---------------------------------------------------------------------------
    @staticmethod
    def enqueue(session, *, dataset_id: str, config: dict, max_attempts: int, priority: int = 0) -> Job:
        job = Job(dataset_id=dataset_id, config=config, priority=priority, max_attempts=max_attempts,
                  progress={})
        session.add(job)
        session.flush()
        return job

    @staticmethod
    def request_cancel(session, job: Job) -> None:
        """A queued job is cancelled at once; a running one is told to stop at its next step."""
        # Decide on the row as it is now, locked: a worker may have claimed or even finished the
        # job since the caller loaded it, and writing status from a stale read would overwrite
        # that (a running or succeeded job, model published, shown as cancelled).
        session.refresh(job, with_for_update=True)
        now = utcnow()
        if job.status == QUEUED:
            job.status, job.finished_at = CANCELLED, now
        elif job.status == RUNNING:
            job.cancel_requested = True

    # -- worker side ------------------------------------------------------------------------
    def claim(self, worker_id: str) -> Claim | None:
        now = utcnow()
        token = secrets.token_hex(16)
        oldest_ready = (
            select(Job.id)
            .where(Job.status == QUEUED, Job.run_after <= now)
            .order_by(Job.priority, Job.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        stmt = (
            update(Job)
            .where(Job.id == oldest_ready, Job.status == QUEUED)
            .values(status=RUNNING, worker_id=worker_id, lease_token=token, heartbeat_at=now,
                    started_at=now, attempts=Job.attempts + 1)
            .returning(Job.id, Job.dataset_id, Job.config, Job.attempts)
            .execution_options(synchronize_session=False)
        )
        with self.db.session() as s:
            row = s.execute(stmt).first()
        if row is None:
            return None
        return Claim(job_id=row.id, lease_token=token, dataset_id=row.dataset_id,
                     config=row.config, attempt=row.attempts)

    def _leased(self, claim: Claim):
        return and_(Job.id == claim.job_id, Job.lease_token == claim.lease_token, Job.status == RUNNING)

    def heartbeat(self, claim: Claim) -> str:
        """Renew the lease. Returns "ok", "cancel" (the user asked to stop) or "lost"."""
        with self.db.session() as s:
            row = s.execute(
                update(Job).where(self._leased(claim)).values(heartbeat_at=utcnow())
                .returning(Job.cancel_requested).execution_options(synchronize_session=False)
            ).first()
        if row is None:
            return "lost"
        return "cancel" if row.cancel_requested else "ok"

    def report_progress(self, claim: Claim, progress: dict) -> bool:
        with self.db.session() as s:
            res = s.execute(update(Job).where(self._leased(claim)).values(progress=progress)
                            .execution_options(synchronize_session=False))
        return res.rowcount == 1

    def publish(self, claim: Claim, model: Model) -> bool:
        """Insert the model row and mark the job succeeded in one transaction, only under lease."""
        model.id = model.id or new_id()
        with self.db.session() as s:
            res = s.execute(
                update(Job).where(self._leased(claim))
                .values(status=SUCCEEDED, finished_at=utcnow(), model_id=model.id, lease_token=None,
                        error_code=None, error_message=None)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount != 1:
                return False  # lease lost: the update matched nothing, so nothing changes
            s.add(model)
        return True

    def finish_cancelled(self, claim: Claim) -> bool:
        return self._finish(claim, CANCELLED, None, None)

    def fail(self, claim: Claim, code: str, message: str, *, retryable: bool) -> str:
        """Record an error; retryable errors go back to the queue with backoff until attempts run out.

        Returns the job's new status, or "lost" when the lease was no longer held.
        """
        with self.db.session() as s:
            job = s.execute(select(Job.attempts, Job.max_attempts).where(self._leased(claim))).first()
            if job is None:
                return "lost"
            if retryable and job.attempts < job.max_attempts:
                values = dict(status=QUEUED, run_after=utcnow() + self._backoff(job.attempts))
            else:
                values = dict(status=FAILED, finished_at=utcnow())
            s.execute(update(Job).where(self._leased(claim))
                      .values(**values, lease_token=None, worker_id=None, error_code=code,
                              error_message=message)
                      .execution_options(synchronize_session=False))
        return values["status"]

    def release(self, claim: Claim) -> bool:
        """Give an unfinished job back to the queue (graceful shutdown); the attempt is not counted."""
        with self.db.session() as s:
            res = s.execute(update(Job).where(self._leased(claim))
                            .values(status=QUEUED, lease_token=None, worker_id=None,
                                    attempts=Job.attempts - 1)
                            .execution_options(synchronize_session=False))
        return res.rowcount == 1

    def _finish(self, claim: Claim, status: str, code: str | None, message: str | None) -> bool:
        with self.db.session() as s:
            res = s.execute(update(Job).where(self._leased(claim))
                            .values(status=status, finished_at=utcnow(), lease_token=None,
                                    error_code=code, error_message=message)
                            .execution_options(synchronize_session=False))
        return res.rowcount == 1

    def requeue_stale(self) -> list[str]:
        """Re-queue running jobs whose worker went silent; fail those out of attempts, and finish
        as cancelled those the user had asked to stop (they must not run again)."""
        now = utcnow()
        silent = and_(Job.status == RUNNING, Job.heartbeat_at < now - timedelta(seconds=self.stale_after_s))
        lost = "the worker running this job stopped responding"
        with self.db.session() as s:
            cancelled = s.execute(
                update(Job).where(silent, Job.cancel_requested.is_(True))
                .values(status=CANCELLED, finished_at=now, lease_token=None, worker_id=None)
                .returning(Job.id).execution_options(synchronize_session=False)
            ).scalars().all()
            failed = s.execute(
                update(Job).where(silent, Job.attempts >= Job.max_attempts)
                .values(status=FAILED, finished_at=now, lease_token=None, worker_id=None,
                        error_code="worker_lost", error_message=lost + "; no attempts left")
                .returning(Job.id).execution_options(synchronize_session=False)
            ).scalars().all()
            requeued = s.execute(
                update(Job).where(silent)
                .values(status=QUEUED, lease_token=None, worker_id=None, run_after=now,
                        error_code="worker_lost", error_message=lost + "; re-queued")
                .returning(Job.id).execution_options(synchronize_session=False)
            ).scalars().all()
        return list(requeued) + list(failed) + list(cancelled)

    def _backoff(self, attempts: int) -> timedelta:
        base = self.retry_backoff_s * 2 ** max(0, attempts - 1)
        return timedelta(seconds=min(base, 300.0) * random.uniform(0.5, 1.0))
