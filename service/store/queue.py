"""The job queue: every SQL statement about a job's life lives here.

A job is a row. Workers claim atomically (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: the whole
database is locked for the claiming transaction, so the status='queued' re-check cannot pass for
two workers). Each claim gets a fresh lease token, and every later write by a worker is
conditional on still holding it, so a worker that lost its lease changes nothing. Each change
of state also appends a `job_event` row in the same transaction, so the event log and the job
never disagree.
"""
from __future__ import annotations

import random
import secrets
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from service.enums import ACTIVE, TERMINAL, JobKind, JobStatus  # noqa: F401  (re-exported for the server side)
from service.store.db import Database, utcnow
from service.store.tables import DEFAULT_PROJECT_ID, Job, JobEvent, Model, WorkerRecord
from service.store.wakeups import jobs_claimable
from service.webhooks.outbox import enqueue_job_end

MAX_BACKOFF_S = 300.0


@dataclass(frozen=True)
class Claim:
    job_id: str
    lease_token: str
    dataset_id: str
    config: dict
    attempt: int
    project_id: str = DEFAULT_PROJECT_ID
    checkpoint_epoch: int | None = None
    checkpoint_file: str | None = None
    kind: str = JobKind.train  # what the worker runs: training, or a batch prediction
    source_model_id: str | None = None  # batch_predict: the model it predicts with


@dataclass(frozen=True)
class ModelRecord:
    """A trained model as a worker hands it to publish(); its job, dataset and project come from the claim."""

    id: str
    backbone: str
    classes: list[str]
    metrics: dict
    recipe: dict
    artifact_dir: str  # relative to the data dir (Settings.relative_to_data)
    sha256: str
    size_bytes: int


def add_event(session: Session, job_id: str, kind: str, **data) -> None:
    """Append to the job's log, numbered after its last event. The counter lives on the job row,
    whose lock orders concurrent writers (the worker's progress, a user's cancel)."""
    seq, project_id = session.execute(
        update(Job).where(Job.id == job_id).values(event_seq=Job.event_seq + 1)
        .returning(Job.event_seq, Job.project_id).execution_options(synchronize_session=False)).one()
    session.add(JobEvent(job_id=job_id, seq=seq, kind=kind, data=data))
    if kind == "status":  # every end of a job passes here: its webhook event joins the same transaction
        enqueue_job_end(session, project_id, job_id, data)


class JobQueue:
    def __init__(self, db: Database, *, stale_after_s: float, retry_backoff_s: float = 2.0,
                 clock: Callable[[], datetime] = utcnow):
        self.db = db
        self.stale_after_s = stale_after_s
        self.retry_backoff_s = retry_backoff_s
        self.now = clock  # injectable so tests can check backoff without sleeping

    # -- API side ---------------------------------------------------------------------------
    @staticmethod
    def enqueue(session, *, dataset_id: str, config: dict, max_attempts: int, priority: int = 0,
                requires_gpu: bool = False, project_id: str = DEFAULT_PROJECT_ID,
                kind: JobKind = JobKind.train, source_model_id: str | None = None) -> Job:
        job = Job(project_id=project_id, dataset_id=dataset_id, config=config, priority=priority, max_attempts=max_attempts,
                  requires_gpu=requires_gpu, progress={}, attempt_history=[], kind=kind,
                  source_model_id=source_model_id)
        session.add(job)
        session.flush()
        add_event(session, job.id, "status", status=JobStatus.queued)
        jobs_claimable(session)
        return job

    @staticmethod
    def request_cancel(session, job: Job) -> None:
        """A queued job is cancelled at once; a running one is told to stop at its next step."""
        # Decide on the row as it is now, locked: a worker may have claimed or even finished the
        # job since the caller loaded it, and writing status from a stale read would overwrite
        # that (a running or succeeded job, model published, shown as cancelled).
        session.refresh(job, with_for_update=True)
        if job.status == JobStatus.queued:
            job.status, job.finished_at = JobStatus.cancelled, utcnow()
            add_event(session, job.id, "status", status=JobStatus.cancelled)
        elif job.status == JobStatus.running and not job.cancel_requested:
            job.cancel_requested = True
            add_event(session, job.id, "cancel_requested")

    @staticmethod
    def get(session, job_id: str) -> Job | None:
        return session.get(Job, job_id)

    @staticmethod
    def list_jobs(session, project_id: str, *, status: JobStatus | None = None, limit: int = 100,
             offset: int = 0) -> list[Job]:
        """The project's jobs, newest first, optionally of one status."""
        query = select(Job).where(Job.project_id == project_id)
        if status:
            query = query.where(Job.status == status)
        return list(session.scalars(query.order_by(Job.created_at.desc()).limit(limit).offset(offset)))

    @staticmethod
    def status_of(session, job_id: str) -> str | None:
        return session.scalar(select(Job.status).where(Job.id == job_id))

    @staticmethod
    def active_count(session, project_id: str) -> int:
        """The project's queued and running jobs (what its concurrent-jobs quota counts)."""
        return session.scalar(select(func.count()).select_from(Job).where(Job.project_id == project_id,
                                                                         Job.status.in_(ACTIVE)))

    @staticmethod
    def of_project(session, job_ids: set[str], project_id: str) -> set[str]:
        """Those of `job_ids` that belong to the project."""
        return set(session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.project_id == project_id)))

    @staticmethod
    def cancel_project_jobs(session, project_id: str) -> list[str]:
        """Cancel every queued or running job of the project; returns the ids still running (told to stop)."""
        for job in session.scalars(select(Job).where(Job.project_id == project_id, Job.status.in_(ACTIVE))).all():
            JobQueue.request_cancel(session, job)
        return JobQueue.running_of_project(session, project_id)

    @staticmethod
    def running_of_project(session, project_id: str) -> list[str]:
        return list(session.scalars(select(Job.id).where(Job.project_id == project_id,
                                                         Job.status == JobStatus.running)))

    @staticmethod
    def delete_project_jobs(session, project_id: str) -> list[str]:
        """Delete the project's jobs and their events (none may be running: a worker would write on);
        returns their ids. Its models must be gone first (they point at their jobs)."""
        ids = list(session.scalars(select(Job.id).where(Job.project_id == project_id).with_for_update()))
        if ids:
            session.execute(delete(JobEvent).where(JobEvent.job_id.in_(ids)))
            session.execute(delete(Job).where(Job.id.in_(ids)))
        return ids

    @staticmethod
    def count_by_status(session) -> dict[str, int]:
        return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())

    @staticmethod
    def waiting(session) -> tuple[int, datetime | None]:
        """How many jobs are queued, and when the oldest of them was created."""
        return tuple(session.execute(select(func.count(), func.min(Job.created_at))
                                     .where(Job.status == JobStatus.queued)).one())

    @staticmethod
    def finished_runs(session) -> list[tuple[str, datetime, datetime]]:
        """(final status, started_at, finished_at) of every job that ran and ended."""
        return [tuple(row) for row in session.execute(
            select(Job.status, Job.started_at, Job.finished_at)
            .where(Job.status.in_(TERMINAL), Job.started_at.is_not(None), Job.finished_at.is_not(None)))]

    @staticmethod
    def events(session, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[JobEvent]:
        """The job's events numbered after `after_seq` (an event's seq is its id to users)."""
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
                                    .order_by(JobEvent.seq).limit(limit)))

    def live_workers(self, session) -> list[WorkerRecord]:
        fresh = self.now() - timedelta(seconds=self.stale_after_s)
        return list(session.scalars(select(WorkerRecord).where(WorkerRecord.stopped_at.is_(None),
                                                               WorkerRecord.heartbeat_at >= fresh)
                                    .order_by(WorkerRecord.started_at)))

    def wait_stopped(self, project_id: str, timeout_s: float, poll_s: float = 0.2) -> bool:
        """Wait until none of the project's jobs runs (after cancel_project_jobs); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.db.session(readonly=True) as s:
                if not self.running_of_project(s, project_id):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    # -- worker side ------------------------------------------------------------------------
    def claim(self, worker_id: str, *, has_gpu: bool = False) -> Claim | None:
        now = self.now()
        token = secrets.token_hex(16)
        oldest_ready = (
            select(Job.id).where(*self._queued_for(has_gpu), Job.run_after <= now)
            .order_by(Job.priority, Job.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        stmt = (
            update(Job)
            .where(Job.id == oldest_ready, Job.status == JobStatus.queued)
            .values(status=JobStatus.running, worker_id=worker_id, lease_token=token, heartbeat_at=now,
                    started_at=now, attempts=Job.attempts + 1, cancel_requested=False)
            .returning(Job.id, Job.project_id, Job.dataset_id, Job.config, Job.attempts, Job.checkpoint_epoch,
                       Job.checkpoint_file, Job.kind, Job.source_model_id)
            .execution_options(synchronize_session=False)
        )
        with self.db.session() as s:
            row = s.execute(stmt).first()
            if row is None:
                return None
            add_event(s, row.id, "status", status=JobStatus.running, attempt=row.attempts, worker_id=worker_id)
        return Claim(job_id=row.id, lease_token=token, project_id=row.project_id, dataset_id=row.dataset_id,
                     config=row.config,
                     attempt=row.attempts, checkpoint_epoch=row.checkpoint_epoch,
                     checkpoint_file=row.checkpoint_file, kind=row.kind, source_model_id=row.source_model_id)

    def next_run_after(self, *, has_gpu: bool = False) -> datetime | None:
        """When the first queued job still in its retry backoff becomes claimable. Nobody is
        notified at that moment, so an idle worker sets its alarm by it."""
        with self.db.session(readonly=True) as s:
            return s.scalar(select(func.min(Job.run_after)).where(*self._queued_for(has_gpu),
                                                                   Job.run_after > self.now()))

    @staticmethod
    def _queued_for(has_gpu: bool) -> list:
        queued = Job.status == JobStatus.queued
        return [queued] if has_gpu else [queued, Job.requires_gpu.is_(False)]

    def _leased(self, claim: Claim):
        return and_(Job.id == claim.job_id, Job.lease_token == claim.lease_token, Job.status == JobStatus.running)

    def heartbeat(self, claim: Claim) -> str:
        """Renew the lease. Returns "ok", "cancel" (the user asked to stop) or "lost"."""
        with self.db.session() as s:
            row = s.execute(
                update(Job).where(self._leased(claim)).values(heartbeat_at=self.now())
                .returning(Job.cancel_requested).execution_options(synchronize_session=False)
            ).first()
        if row is None:
            return "lost"
        return "cancel" if row.cancel_requested else "ok"

    def lease_state(self, claim: Claim) -> str:
        """Like heartbeat, read-only: cheap enough to ask every second for a prompt cancel."""
        with self.db.session() as s:
            row = s.execute(select(Job.cancel_requested).where(self._leased(claim))).first()
        if row is None:
            return "lost"
        return "cancel" if row.cancel_requested else "ok"

    def report_progress(self, claim: Claim, progress: dict, events: dict | list[dict] | None = None) -> bool:
        """Store the job's progress; `events` (each a dict with its "kind", e.g. an epoch's metrics)
        are logged with it, in the same transaction."""
        with self.db.session() as s:
            res = s.execute(update(Job).where(self._leased(claim)).values(progress=progress)
                            .execution_options(synchronize_session=False))
            if res.rowcount != 1:
                return False
            for event in [events] if isinstance(events, dict) else events or []:
                data = dict(event)
                add_event(s, claim.job_id, data.pop("kind", "epoch"), **data)
        return True

    def record_checkpoint(self, claim: Claim, epoch: int, file: str) -> bool:
        """Point the job at a checkpoint file written under this lease (a stale holder's files
        are never pointed at, so they can never be resumed from)."""
        with self.db.session() as s:
            res = s.execute(update(Job).where(self._leased(claim))
                            .values(checkpoint_epoch=epoch, checkpoint_file=file)
                            .execution_options(synchronize_session=False))
        return res.rowcount == 1

    def publish(self, claim: Claim, record: ModelRecord) -> bool:
        """Insert the model row and mark the job succeeded in one transaction, only under lease."""
        with self.db.session() as s:
            res = s.execute(
                update(Job).where(self._leased(claim))
                .values(status=JobStatus.succeeded, finished_at=self.now(), model_id=record.id, lease_token=None,
                        error_code=None, error_message=None)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount != 1:
                return False  # lease lost: the update matched nothing, so nothing changes
            s.add(Model(**asdict(record), project_id=claim.project_id, job_id=claim.job_id,
                        dataset_id=claim.dataset_id))
            add_event(s, claim.job_id, "status", status=JobStatus.succeeded, model_id=record.id)
        return True

    def finish_batch(self, claim: Claim, progress: dict) -> bool:
        """Mark a batch prediction succeeded with its final progress, only under lease."""
        with self.db.session() as s:
            res = s.execute(update(Job).where(self._leased(claim))
                            .values(status=JobStatus.succeeded, finished_at=self.now(), lease_token=None,
                                    progress=progress, error_code=None, error_message=None)
                            .execution_options(synchronize_session=False))
            if res.rowcount != 1:
                return False
            add_event(s, claim.job_id, "status", status=JobStatus.succeeded, images=progress.get("done"))
        return True

    def finish_cancelled(self, claim: Claim) -> bool:
        with self.db.session() as s:
            res = s.execute(update(Job).where(self._leased(claim))
                            .values(status=JobStatus.cancelled, finished_at=self.now(), lease_token=None)
                            .execution_options(synchronize_session=False))
            if res.rowcount != 1:
                return False
            add_event(s, claim.job_id, "status", status=JobStatus.cancelled)
        return True

    def fail(self, claim: Claim, code: str, message: str, *, retryable: bool) -> str:
        """Record an error; retryable errors go back to the queue with backoff until attempts run out.

        Returns the job's new status, or "lost" when the lease was no longer held.
        """
        with self.db.session() as s:
            job = s.scalars(select(Job).where(self._leased(claim)).with_for_update()).first()
            if job is None:
                return "lost"
            return self._end_attempt(s, job, code, message, retryable=retryable)

    def _end_attempt(self, s: Session, job: Job, code: str, message: str, *, retryable: bool) -> str:
        now = self.now()
        job.attempt_history = [*job.attempt_history, {
            "attempt": job.attempts, "worker_id": job.worker_id,
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "ended_at": now.isoformat(), "error_code": code, "error_message": message}]
        job.error_code, job.error_message = code, message
        job.lease_token, job.worker_id = None, None
        if retryable and job.attempts < job.max_attempts:
            job.status, job.run_after = JobStatus.queued, now + self._backoff(job.attempts)
            add_event(s, job.id, "status", status=JobStatus.queued, retry_at=job.run_after.isoformat(),
                      error_code=code, error_message=message)
            jobs_claimable(s)  # at once without backoff; otherwise idle workers set their alarm by it
        else:
            job.status, job.finished_at = JobStatus.failed, now
            add_event(s, job.id, "status", status=JobStatus.failed, error_code=code, error_message=message)
        return job.status

    def release(self, claim: Claim) -> bool:
        """Give an unfinished job back to the queue (graceful shutdown); the attempt is not counted."""
        with self.db.session() as s:
            res = s.execute(update(Job).where(self._leased(claim))
                            .values(status=JobStatus.queued, lease_token=None, worker_id=None,
                                    attempts=Job.attempts - 1, run_after=self.now())
                            .execution_options(synchronize_session=False))
            if res.rowcount != 1:
                return False
            add_event(s, claim.job_id, "status", status=JobStatus.queued, reason="worker shut down; handed back")
            jobs_claimable(s)
        return True

    def defer(self, claim: Claim, code: str, message: str, delay_s: float) -> bool:
        """Give a job back to the queue for `delay_s` because something outside it is down (the object
        store): the attempt is not counted, so an outage never fails the job; it resumes from its
        last checkpoint."""
        with self.db.session() as s:
            retry_at = self.now() + timedelta(seconds=delay_s)
            res = s.execute(update(Job).where(self._leased(claim))
                            .values(status=JobStatus.queued, lease_token=None, worker_id=None,
                                    attempts=Job.attempts - 1, run_after=retry_at, error_code=code,
                                    error_message=message)
                            .execution_options(synchronize_session=False))
            if res.rowcount != 1:
                return False
            add_event(s, claim.job_id, "status", status=JobStatus.queued, retry_at=retry_at.isoformat(),
                      error_code=code, error_message=message)
            jobs_claimable(s)
        return True

    def requeue_stale(self) -> list[str]:
        """Re-queue running jobs whose worker went silent (with backoff), fail those out of
        attempts, and finish as cancelled those the user had asked to stop."""
        now = self.now()
        cutoff = now - timedelta(seconds=self.stale_after_s)
        silent = and_(Job.status == JobStatus.running, Job.heartbeat_at < cutoff)
        with self.db.session() as s:
            jobs = s.scalars(select(Job).where(silent).with_for_update(skip_locked=True)).all()
            for job in jobs:
                if job.cancel_requested:
                    job.status, job.finished_at, job.lease_token, job.worker_id = JobStatus.cancelled, now, None, None
                    add_event(s, job.id, "status", status=JobStatus.cancelled, reason="worker lost while cancelling")
                else:
                    self._end_attempt(s, job, "worker_lost", "the worker running this job stopped "
                                      "responding (crashed, killed or cut off)", retryable=True)
        return [j.id for j in jobs]

    def _backoff(self, attempts: int) -> timedelta:
        """Exponential backoff with full jitter in [base/2, base]."""
        base = min(self.retry_backoff_s * 2 ** max(0, attempts - 1), MAX_BACKOFF_S)
        return timedelta(seconds=base * random.uniform(0.5, 1.0))

    # -- worker registry --------------------------------------------------------------------
    def register_worker(self, worker_id: str, host: str, pid: int, device: str) -> None:
        with self.db.session() as s:
            s.merge(WorkerRecord(id=worker_id, host=host, pid=pid, device=device, started_at=self.now(),
                                 heartbeat_at=self.now(), current_job_id=None, stopped_at=None))

    def worker_alive(self, worker_id: str, current_job_id: str | None) -> None:
        with self.db.session() as s:
            s.execute(update(WorkerRecord).where(WorkerRecord.id == worker_id)
                      .values(heartbeat_at=self.now(), current_job_id=current_job_id))

    def worker_stopped(self, worker_id: str) -> None:
        with self.db.session() as s:
            s.execute(update(WorkerRecord).where(WorkerRecord.id == worker_id)
                      .values(stopped_at=self.now(), current_job_id=None))
            # Forget workers that stopped long ago so the table stays small.
            s.execute(delete(WorkerRecord).where(or_(
                WorkerRecord.stopped_at < self.now() - timedelta(days=1),
                WorkerRecord.heartbeat_at < self.now() - timedelta(days=7))))
