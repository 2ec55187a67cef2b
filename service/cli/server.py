"""Commands that run Graft on this machine: `graft serve` (API + worker processes, the process
supervisor), `graft worker`, `graft migrate`, `graft keys create`. Heavy imports stay inside them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Annotated, Optional

import typer

from service.cli.base import LogFormat, LogFormatOpt, app, err, keys_app, log
from service.enums import Scope


@app.command()
def serve(host: Annotated[Optional[str], typer.Option(help="bind address (GRAFT_HOST, default 127.0.0.1)")] = None,
          port: Annotated[Optional[int], typer.Option(help="port (GRAFT_PORT, default 8000)")] = None,
          workers: Annotated[Optional[int], typer.Option(help="worker processes (GRAFT_WORKERS, default 1)")] = None,
          api_processes: Annotated[Optional[int], typer.Option(
              help="API processes on the one port, each with its own inference engine (GRAFT_API_PROCESSES, "
                   "default 1); set GRAFT_RATE_LIMIT_STORAGE=redis://… so rate limits hold across them")] = None,
          no_migrate: Annotated[bool, typer.Option("--no-migrate", help="do not apply migrations at start")] = False,
          log_format: LogFormatOpt = LogFormat.auto):
    """Run the API with worker child processes (the embedded default)."""
    import uvicorn

    from service.app import create_app

    settings = _settings(log_format, host=host, port=port, workers=workers, api_processes=api_processes)
    from service.api.auth import auth_is_open, check_exposure
    from service.api.routes.health import OPEN_WARNING

    check_exposure(settings)
    if auth_is_open(settings):
        log.warning("*** %s ***", OPEN_WARNING, extra={"action": "auth_open"})
    # uvicorn ends by re-raising the signal it caught; with Python's default SIGTERM handler that
    # kills the process before `finally` stops the workers (orphans that train on), and a Ctrl-C
    # ends in a KeyboardInterrupt traceback. Exit cleanly instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    if not no_migrate:
        _migrate(settings)
    children = WorkerProcesses(settings, log_format.value)
    children.start()
    try:
        log.info("Graft API on http://%s:%d (%d process(es)) with %d worker(s); data in %s", settings.host,
                 settings.port, settings.api_processes, settings.workers, settings.data_dir.resolve(),
                 extra={"action": "serve_start"})
        # Our logging config stays; the request middleware writes the access log (with request ids).
        if settings.api_processes > 1:
            # uvicorn's supervisor binds the port once and starts N processes that accept on it; each
            # builds its own app (engine, model cache, dispatcher) from the environment, so the
            # options given here travel there.
            os.environ.update({"GRAFT_HOST": settings.host, "GRAFT_PORT": str(settings.port),
                               "GRAFT_LOG_FORMAT": log_format.value, "GRAFT_DATA_DIR": str(settings.data_dir.resolve()),
                               "GRAFT_DATABASE_URL": settings.database_url})
            uvicorn.run("service.app:create_app_from_env", factory=True, host=settings.host, port=settings.port,
                        workers=settings.api_processes, log_config=None, access_log=False,
                        timeout_worker_healthcheck=120)  # importing torch on a busy machine is slow
        else:
            uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                        access_log=False)
    finally:
        # Workers get their drain time (finish or checkpoint the job, hand it back) before a kill.
        children.stop(grace_s=getattr(settings, "shutdown_grace_s", 10.0) + 5.0)


@app.command()
def worker(max_jobs: Annotated[Optional[int], typer.Option(help="exit after this many jobs")] = None,
           device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda:N (GRAFT_WORKER_DEVICE)")] = None,
           log_format: LogFormatOpt = LogFormat.auto):
    """Run one training worker against GRAFT_DATABASE_URL."""
    from workers.worker import Worker

    runner = Worker(_settings(log_format, worker_device=device))
    runner.install_signal_handlers()
    runner.run(max_jobs=max_jobs)


@app.command()
def migrate(log_format: LogFormatOpt = LogFormat.auto):
    """Create or upgrade the database schema."""
    _migrate(_settings(log_format))



@keys_app.command("create")
def keys_create(project: Annotated[Optional[str], typer.Option(
                    help="project name; created if it does not exist (not with --operator)")] = None,
                scope: Annotated[Scope, typer.Option(help="admin, train or predict")] = Scope.admin,
                name: Annotated[str, typer.Option(help="a name to recognise the key by")] = "cli",
                operator: Annotated[bool, typer.Option(
                    "--operator", help="a server operator's key: creates, re-quotas and deletes projects, "
                                       "sees every project and worker")] = False,
                alias: Annotated[Optional[list[str]], typer.Option(
                    help="predict keys: may predict only through this alias (repeat for several)")] = None,
                log_format: LogFormatOpt = LogFormat.auto):
    """Create a key straight in the database (GRAFT_DATABASE_URL); it is printed once, never stored."""
    from service.api.auth import create_key, create_project, project_named
    from service.errors import GraftError
    from service.store.db import Database
    from service.store.tables import DEFAULT_PROJECT_ID

    if operator == (project is not None):
        raise typer.BadParameter("give either --project NAME (a project's key) or --operator (the server's)")
    settings = _settings(log_format)
    _migrate(settings)
    db = Database(settings.database_url)
    with db.session() as session:
        if operator:  # an operator's key lives in the default project, which is never deleted
            project_id, scope = DEFAULT_PROJECT_ID, Scope.admin
        else:
            project_id = (project_named(session, project) or create_project(session, project)).id
        try:
            key, plaintext = create_key(session, project_id, name, scope.value, operator=operator, aliases=alias)
        except GraftError as exc:  # an alias restriction that does not fit
            raise typer.BadParameter(exc.detail) from None
        key_id = key.id
    db.dispose()
    what = f"operator key {key_id}" if operator else f"project {project} ({project_id}), key {key_id}, scope {scope.value}"
    err.print(f"{what}. The key is shown once:")
    print(plaintext)


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(0)


def _settings(log_format: LogFormat, **overrides):
    from service.api.observability import configure_logging
    from service.settings import Settings

    configure_logging(log_format.value)
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    settings.ensure_dirs()
    return settings


def _migrate(settings) -> None:
    from service.store.migrate import upgrade

    upgrade(settings.database_url)
    log.info("database schema is up to date", extra={"action": "migrate"})


class WorkerProcesses:
    """`graft serve`'s worker children: each is `graft worker`; one that dies is restarted."""

    def __init__(self, settings, log_format: str = "auto"):
        self.settings = settings
        self.procs: list[subprocess.Popen] = []
        self._stopping = threading.Event()
        # Children read the same settings through the environment, resolved once here.
        self.env = {**os.environ, "GRAFT_DATA_DIR": str(settings.data_dir.resolve()),
                    "GRAFT_DATABASE_URL": settings.database_url, "GRAFT_LOG_FORMAT": log_format}

    def _spawn(self, device: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--device", device], env=self.env,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def devices(self) -> list[str]:
        """One worker per visible GPU when the device is `auto` and there are GPUs; else N of the setting."""
        if self.settings.worker_device == "auto" and self.settings.workers > 0:
            import torch

            if torch.cuda.is_available():
                return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return [self.settings.worker_device] * self.settings.workers

    def start(self) -> None:
        self.device_of = self.devices()
        self.procs = [self._spawn(device) for device in self.device_of]
        threading.Thread(target=self._watch, daemon=True, name="worker-watch").start()

    def _watch(self) -> None:
        while not self._stopping.wait(2.0):
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None and not self._stopping.is_set():
                    log.warning("worker pid %d exited with %s; restarting", proc.pid, proc.returncode,
                                extra={"action": "worker_restart"})
                    self.procs[i] = self._spawn(self.device_of[i])

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


def _die_with_parent() -> None:
    # In the child before exec: SIGTERM it when `graft serve` dies, even by SIGKILL, so no worker
    # outlives its server. (Linux: prctl PR_SET_PDEATHSIG.)
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)

