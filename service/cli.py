"""The `graft` command: serve (API + worker processes), worker, migrate."""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading

from service.settings import Settings

log = logging.getLogger("graft")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="graft", description="Transfer learning on images as a service.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the API with worker child processes (embedded default)")
    serve.add_argument("--host", help="bind address (GRAFT_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (GRAFT_PORT, default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes to start (GRAFT_WORKERS, default 1)")
    serve.add_argument("--no-migrate", action="store_true", help="do not apply migrations at start")
    worker = sub.add_parser("worker", help="run one training worker against GRAFT_DATABASE_URL")
    worker.add_argument("--max-jobs", type=int, help="exit after this many jobs")
    sub.add_parser("migrate", help="create or upgrade the database schema")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    overrides = {k: v for k, v in {"host": getattr(args, "host", None), "port": getattr(args, "port", None),
                                   "workers": getattr(args, "workers", None)}.items() if v is not None}
    settings = Settings(**overrides)
    settings.ensure_dirs()
    {"serve": _serve, "worker": _worker, "migrate": _migrate}[args.command](settings, args)


def _migrate(settings: Settings, _args=None) -> None:
    from service.migrate import upgrade

    upgrade(settings.database_url)
    log.info("database schema is up to date")


def _worker(settings: Settings, args) -> None:
    from workers.worker import Worker

    worker = Worker(settings)
    worker.install_signal_handlers()
    worker.run(max_jobs=args.max_jobs)


def _serve(settings: Settings, args) -> None:
    import uvicorn

    from service.app import create_app

    if not args.no_migrate:
        _migrate(settings)
    children = WorkerProcesses(settings)
    children.start()
    try:
        log.info("Graft API on http://%s:%d with %d worker(s); data in %s", settings.host, settings.port,
                 settings.workers, settings.data_dir.resolve())
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    finally:
        children.stop()


class WorkerProcesses:
    """`graft serve`'s worker children: each is `graft worker`; one that dies is restarted."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.procs: list[subprocess.Popen] = []
        self._stopping = threading.Event()
        # Children read the same settings through the environment, resolved once here.
        self.env = {**os.environ, "GRAFT_DATA_DIR": str(settings.data_dir.resolve()),
                    "GRAFT_DATABASE_URL": settings.database_url}

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=self.env)

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.settings.workers)]
        threading.Thread(target=self._watch, daemon=True, name="worker-watch").start()

    def _watch(self) -> None:
        while not self._stopping.wait(2.0):
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None and not self._stopping.is_set():
                    log.warning("worker pid %d exited with %s; restarting", proc.pid, proc.returncode)
                    self.procs[i] = self._spawn()

    def stop(self, grace_s: float = 10.0) -> None:
        self._stopping.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
