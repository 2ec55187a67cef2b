"""Waking idle workers when a job becomes claimable, so pickup takes milliseconds, not a poll.

Workers claim at least every poll interval; these wake-ups only make them claim sooner. A lost
one (listener down, FIFO full, a crash between commit and poke) delays a job, never strands it.
PostgreSQL: NOTIFY in the transaction that makes the job claimable, LISTEN in each worker.
SQLite: a FIFO next to the database file, poked after such a transaction commits.
"""
from __future__ import annotations

import logging
import os
import socket
import stat
import time
from pathlib import Path
from select import select as select_readable

from sqlalchemy import event, text
from sqlalchemy.orm import Session

from service.store.db import Database, sqlite_file

JOBS_CHANNEL = "graft_jobs"  # PostgreSQL: NOTIFYed by every commit that makes a job claimable
LISTENER_NAME = "graft-worker-listen"  # application_name of the workers' LISTEN connections
_WAKE_FIFO = "graft_wake_fifo"  # Session.info key: the FIFO to poke once the transaction commits

log = logging.getLogger("graft.wakeups")

def wake_fifo(db_file: Path) -> Path:
    """SQLite: the FIFO idle workers wait on, next to the database like its -wal and -shm files."""
    return db_file.with_name(db_file.name + "-wake")


def jobs_claimable(session: Session) -> None:
    """This transaction makes a job claimable: wake idle workers, but only once it commits."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        # PostgreSQL delivers a NOTIFY when its transaction commits and drops it on rollback.
        session.execute(text(f"NOTIFY {JOBS_CHANNEL}"))
    elif (db_file := sqlite_file(bind.engine.url)) is not None:
        # Under `graft serve` the API and the workers are separate processes: an in-process event
        # would wake nobody, so the wake-up goes through the file system.
        session.info[_WAKE_FIFO] = wake_fifo(db_file)


@event.listens_for(Session, "after_commit")
def _wake_after_commit(session: Session) -> None:
    if (fifo := session.info.pop(_WAKE_FIFO, None)) is not None:
        _poke(fifo)


@event.listens_for(Session, "after_rollback")
def _no_wake_after_rollback(session: Session) -> None:
    session.info.pop(_WAKE_FIFO, None)


def _poke(fifo: Path) -> None:
    """One byte into the FIFO wakes every worker waiting on it. Best effort: never raises."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no FIFO yet, or no worker holds it open: nobody is waiting
        return
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.write(fd, b"\0")
    except OSError:  # full: wake-ups are pending already
        pass
    finally:
        os.close(fd)


def _drain(fd: int) -> bool:
    """Read a non-blocking fd empty; True if there was anything."""
    got = False
    try:
        while os.read(fd, 4096):
            got = True
    except BlockingIOError:
        pass
    return got


class JobWaiter:
    """What an idle worker blocks on instead of sleeping through a whole poll interval.

    PostgreSQL: a dedicated autocommit connection LISTENs on `graft_jobs`. SQLite: a FIFO next to
    the database file, which every commit that makes a job claimable writes a byte into.
    """

    def __init__(self, db: Database, *, reconnect_s: float = 5.0):
        # A socket pair, so that interrupt() ends a wait even from a signal handler.
        self._interrupt_r, self._interrupt_w = socket.socketpair()
        self._interrupt_r.setblocking(False)
        self._interrupt_w.setblocking(False)
        self._source: _PgListener | _FifoListener | None = None
        if db.is_postgres:
            self._source = _PgListener(db.libpq_url(), reconnect_s)
        elif db.sqlite_file is not None:
            self._source = _FifoListener.open(wake_fifo(db.sqlite_file))

    def wait(self, timeout: float) -> bool:
        """Until a wake-up (True), or until `timeout` seconds pass or interrupt() is called (False)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._source is not None and self._source.pending():
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            fds, until = [self._interrupt_r.fileno()], deadline
            if self._source is not None:
                if (fd := self._source.fileno()) is not None:
                    fds.append(fd)
                else:  # listener down: wait no longer than its next reconnect
                    until = min(until, self._source.retry_at)
            ready, _, _ = select_readable(fds, [], [], max(0.0, until - now))
            if self._interrupt_r.fileno() in ready:
                _drain(self._interrupt_r.fileno())
                return False

    def interrupt(self) -> None:
        """End the current (or next) wait at once. Safe from other threads and signal handlers."""
        try:
            self._interrupt_w.send(b"\0")
        except OSError:  # full (already interrupted) or closed (the worker has stopped)
            pass

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
        self._interrupt_r.close()
        self._interrupt_w.close()


class _FifoListener:
    retry_at = float("inf")  # never disconnected

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def open(cls, path: Path) -> "_FifoListener | None":
        try:
            try:
                os.mkfifo(path, 0o660)
            except FileExistsError:
                pass
            # Read-write: this process counts as a writer too, so the FIFO never reads as closed
            # (EOF, readable forever) after a submitter closes it.
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(f"{path} exists and is not a FIFO")
        except OSError as exc:
            log.warning("cannot wait for job wake-ups on %s (%s); polling instead", path, exc,
                        extra={"action": "wakeup_unavailable"})
            return None
        return cls(fd)

    def fileno(self) -> int:
        return self.fd

    def pending(self) -> bool:
        return _drain(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class _PgListener:
    """LISTEN on a connection of its own (autocommit: a LISTEN inside an open transaction would
    hear nothing until it ended); reconnects every `reconnect_s` while it is down."""

    def __init__(self, url: str, reconnect_s: float):
        self.url, self.reconnect_s = url, reconnect_s
        self.conn = None
        self.retry_at = 0.0
        self._failures = 0
        self._connect()

    def _connect(self) -> bool:
        import psycopg

        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5, application_name=LISTENER_NAME,
                                   # TCP keepalives: a server that vanished without closing the
                                   # connection is noticed in about a minute, not never.
                                   keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
            try:
                conn.execute(f"LISTEN {JOBS_CHANNEL}")
            except BaseException:
                conn.close()
                raise
        except psycopg.Error as exc:
            self.retry_at = time.monotonic() + self.reconnect_s
            self._failures += 1
            # Once at warning: a database that stays down is reported by the claims failing too.
            log.log(logging.WARNING if self._failures == 1 else logging.DEBUG,
                    "cannot listen for job notifications (%s); polling, retrying every %.1fs",
                    str(exc).strip(), self.reconnect_s, extra={"action": "listen_failed"})
            return False
        if self._failures:
            log.info("listening for job notifications again", extra={"action": "listen_restored"})
        self.conn, self._failures = conn, 0
        return True

    def fileno(self) -> int | None:
        return self.conn.fileno() if self.conn is not None else None

    def pending(self) -> bool:
        import psycopg

        if self.conn is None:
            # Reconnected: whatever was notified while it was down is lost, so look for work now.
            return time.monotonic() >= self.retry_at and self._connect()
        try:
            return bool(list(self.conn.notifies(timeout=0)))
        except psycopg.Error as exc:
            log.warning("lost the job notification connection (%s); polling, reconnecting in %.1fs",
                        str(exc).strip(), self.reconnect_s, extra={"action": "listen_lost"})
            self.close()
            self.retry_at = time.monotonic() + self.reconnect_s
            self._failures = 1
            return False

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
