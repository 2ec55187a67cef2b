"""Operating Graft: JSON logs carrying a request id, Prometheus /metrics, and /readyz.

Job and model numbers are read from the SQL store at scrape time, so /metrics on the API shows
the whole fleet (every worker process, every machine) without the workers serving anything.
Request and prediction latencies are measured in the API process that serves them.

What a stranger may read: /metrics (totals across every project, and per-route 401/403/404
counts that show probing) takes GRAFT_METRICS_TOKEN or an operator key, and without a token set
answers anonymous callers only on loopback or where Graft runs open. /readyz says ready or not to
anyone (load balancers and probes send no key); its findings (paths, free bytes, database kind
and schema) go only to the operator or a caller on the server's machine.
"""
from __future__ import annotations

import contextvars
import hmac
import json
import logging
import re
import shutil
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select, text

from service.api.auth import auth_is_open, caller_of_key, is_loopback
from service.api.deps import DatabaseDep, MetricsDep, SchemaHeadsDep, SettingsDep
from service.errors import Unauthorized
from service.store.db import Database, utcnow
from service.api.problems import problem
from service.api.schemas import Readiness
from service.enums import TERMINAL, JobStatus
from service.store.queue import JobQueue
from service.store.objects import store_for
from service.store.tables import Model

log = logging.getLogger("graft.http")
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("graft_request_id", default=None)
REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a caller's id is kept only if it is tame
PREDICT_ROUTE = "/v1/models/{model_id}/predict"
PROBE_PATHS = ("/healthz", "/readyz", "/metrics")  # logged at DEBUG: probes would drown the log
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600, float("inf"))
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# -- logs ---------------------------------------------------------------------------------------
_RECORD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, and every `extra` field."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class RequestIdFilter(logging.Filter):
    """Stamps the current request's id on every record logged while serving it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class _CurrentStderr(logging.StreamHandler):
    """A handler on whatever sys.stderr is when it writes, not the one it was made with: a stream
    swapped in for a while (a test's capture, a CLI runner) is closed later, and a handler holding it
    then fails on every record."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(fmt: str = "auto", level: int = logging.INFO) -> None:
    """Route every logger (uvicorn's included) through one handler on stderr.

    fmt: "json" (one object per line, for log shippers), "text", or "auto" (text on a terminal,
    JSON otherwise, so containers log JSON).
    """
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be json, text or auto, not {fmt!r}")
    handler = _CurrentStderr()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


# -- metrics ------------------------------------------------------------------------------------
class StoreCollector:
    """Job, queue and model numbers, queried from the database on each scrape."""

    def __init__(self, db: Database, model_cache):
        self.db, self.model_cache = db, model_cache

    def describe(self):
        return []  # collected lazily: registering must not query the database

    def collect(self):
        loaded = GaugeMetricFamily("graft_models_loaded", "Models held in memory by this API process for prediction")
        loaded.add_metric([], len(self.model_cache))
        yield loaded
        yield GaugeMetricFamily("graft_models_loaded_bytes", "Weight bytes of the loaded models and of their "
                                "frozen CPU copies, each shared backbone counted once (bounded by "
                                "GRAFT_MODEL_CACHE_MB)",
                                value=self.model_cache.total_bytes)
        up = GaugeMetricFamily("graft_database_up", "1 if the last scrape could query the database")
        try:
            with self.db.session() as session:
                families = list(self._from_store(session))
        except Exception:
            logging.getLogger("graft.metrics").warning("metrics scrape could not query the database", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _from_store(self, session):
        now = utcnow()
        counts = JobQueue.count_by_status(session)
        jobs = GaugeMetricFamily("graft_jobs", "Jobs by status", labels=["status"])
        for status in sorted(set(JobStatus) | set(counts)):
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs

        depth, oldest = JobQueue.waiting(session)
        yield GaugeMetricFamily("graft_queue_depth", "Jobs waiting for a worker", value=depth)
        age = (now - oldest).total_seconds() if oldest else 0.0
        yield GaugeMetricFamily("graft_queue_oldest_age_seconds",
                                "How long the oldest queued job has waited (0 when the queue is empty)",
                                value=max(0.0, age))

        # Durations of finished runs, as a histogram per final status (cumulative over all jobs).
        rows = JobQueue.finished_runs(session)
        durations = HistogramMetricFamily("graft_job_duration_seconds",
                                          "Wall time of finished jobs, from claim to finish", labels=["status"])
        for status in TERMINAL:
            values = [(f - s).total_seconds() for st, s, f in rows if st == status]
            buckets = [(_le(b), sum(v <= b for v in values)) for b in DURATION_BUCKETS]
            durations.add_metric([status], buckets, sum_value=sum(values))
        yield durations

        speed = GaugeMetricFamily("graft_training_images_per_second",
                                  "Training throughput of the most recent model per backbone, strategy and device",
                                  labels=["backbone", "strategy", "device"])
        seen = set()
        for backbone, recipe, metrics in session.execute(
                select(Model.backbone, Model.recipe, Model.metrics).order_by(Model.created_at.desc()).limit(200)):
            key = (backbone, (recipe or {}).get("strategy", ""), (metrics or {}).get("device", ""))
            rate = (metrics or {}).get("train_images_per_s")
            if key not in seen and rate is not None:
                seen.add(key)
                speed.add_metric(list(key), float(rate))
        yield speed
        yield GaugeMetricFamily("graft_models", "Trained models in the store",
                                value=session.scalar(select(func.count()).select_from(Model)))


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else str(float(bound))


class Metrics:
    """This app's Prometheus registry (one per app, so tests and embedded apps never collide)."""

    def __init__(self, db: Database, model_cache):
        self.registry = CollectorRegistry()
        self.requests = Counter("graft_http_requests_total", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.request_seconds = Histogram("graft_http_request_duration_seconds", "HTTP request latency",
                                         ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.predict_seconds = Histogram("graft_predict_latency_seconds",
                                         "Latency of POST /v1/models/{id}/predict, upload to answer",
                                         ["status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(StoreCollector(db, model_cache))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(method, route).observe(seconds)
        if route == PREDICT_ROUTE and method == "POST":
            self.predict_seconds.labels(str(status)).observe(seconds)


# -- request id + access log middleware ---------------------------------------------------------
class RequestContext:
    """Gives every request an id (the caller's X-Request-ID if tame, else a new one), returns it
    in X-Request-ID, stamps it on every log record, logs one access line and records metrics."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if _VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        REQUEST_ID.set(request_id)  # the request's own task: no reset needed, nothing leaks out
        started = time.perf_counter()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.encode(), request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            # The route template keeps label values few: /v1/jobs/{job_id}, not every id.
            mount = scope.get("root_path") and f"{scope['root_path']}/{{path}}"  # e.g. /static/{path}
            route = getattr(scope.get("route"), "path", None) or mount or "<unmatched>"
            method, path = scope["method"], scope["path"]
            self.metrics.observe(method, route, status, seconds)
            log.log(logging.DEBUG if path in PROBE_PATHS else logging.INFO,
                    "%s %s %d %.1fms", method, path, status, seconds * 1000,
                    extra={"action": "http_request", "method": method, "path": path, "route": route,
                           "status": status, "duration_ms": round(seconds * 1000, 2),
                           "client": (scope.get("client") or [None])[0]})


# -- endpoints ----------------------------------------------------------------------------------
router = APIRouter(tags=["operations"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, app_metrics: MetricsDep, settings: SettingsDep, db: DatabaseDep) -> Response:
    """Prometheus text exposition."""
    _check_scraper(request, settings, db)
    return Response(generate_latest(app_metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _bearer_value(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _from_this_machine(request: Request, settings) -> bool:
    """No credentials needed: the caller is on loopback, or Graft runs open (no keys) anyway."""
    return auth_is_open(settings) or (request.client is not None and is_loopback(request.client.host))


def _check_scraper(request: Request, settings, db: Database) -> None:
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else ""
    if "authorization" not in request.headers:
        if not token and _from_this_machine(request, settings):
            return
        raise Unauthorized("/metrics needs `Authorization: Bearer <GRAFT_METRICS_TOKEN>` or an operator key"
                           if token else "/metrics answers without credentials only on the server's machine; "
                           "set GRAFT_METRICS_TOKEN and scrape with it (or use an operator key)")
    value = _bearer_value(request)
    if value and token and hmac.compare_digest(value.encode(), token.encode()):
        return
    if value is None:
        raise Unauthorized("the Authorization header is not `Bearer <token>`")
    caller_of_key(db, value).require_operator()  # 401 for a key that is no key, 403 for a project's


def _sees_readiness_details(request: Request, settings, db: Database) -> bool:
    if "authorization" not in request.headers:
        return _from_this_machine(request, settings)
    value = _bearer_value(request)
    try:
        return value is not None and caller_of_key(db, value).operator
    except Exception:  # a bad key, or a database that cannot say: a probe still gets its answer, in short
        return False


@router.get("/readyz", responses={200: {"model": Readiness, "description": "every check passed"},
                                   503: {"description": "a check failed: `detail` says which, `checks` has them "
                                                        "all (both only for the operator or on loopback)"}})
def readyz(request: Request, db: DatabaseDep, heads: SchemaHeadsDep, settings: SettingsDep):
    """Ready to serve: the database answers and is migrated, and the artifact store is writable."""
    checks = {"database": _check(lambda: _database_ready(db, heads)),
              "artifact_store": _check(lambda: _store_writable(settings))}
    detailed = _sees_readiness_details(request, settings, db)
    if all(c["ok"] for c in checks.values()):
        return {"status": "ready", "checks": checks} if detailed else {"status": "ready"}
    if not detailed:
        return problem(503, "not ready", "not_ready")
    failing = "; ".join(f"{name}: {c['error']}" for name, c in checks.items() if not c["ok"])
    return problem(503, f"not ready: {failing}", "not_ready", checks=checks)


def _check(fn) -> dict:
    started = time.perf_counter()
    try:
        detail = fn()
    except Exception as exc:  # a probe reports what failed; it never raises
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                "seconds": round(time.perf_counter() - started, 4)}
    return {"ok": True, **detail, "seconds": round(time.perf_counter() - started, 4)}


def _database_ready(db: Database, heads: set[str]) -> dict:
    with db.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        try:
            current = set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
        except Exception:
            raise RuntimeError("the database has no Graft schema; run `graft migrate`") from None
    if current != heads:
        raise RuntimeError(f"database schema is at {sorted(current) or 'nothing'}, this Graft needs "
                           f"{sorted(heads)}; run `graft migrate`")
    return {"dialect": db.engine.dialect.name, "revision": sorted(current)}


def _store_writable(settings) -> dict:
    for folder in (settings.blobs_dir, settings.models_dir):
        if not Path(folder).is_dir():
            raise RuntimeError(f"{folder} is missing")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".readyz-"):
            pass  # created and removed: the store (or, with an object store, this machine's cache) takes writes
    remote = store_for(settings).check() if settings.storage_url else {}  # an object store: a PUT and a DELETE
    return {"path": str(Path(settings.data_dir).resolve()), "free_bytes": shutil.disk_usage(settings.data_dir).free,
            **remote}


def schema_heads() -> set[str]:
    from alembic.script import ScriptDirectory

    from service.store.migrate import alembic_config

    return set(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


def install_observability(app: FastAPI) -> None:
    """Metrics registry, request-id middleware (outermost, so every response carries the id),
    and the /metrics and /readyz routes."""
    app.state.metrics = Metrics(app.state.db, app.state.model_cache)
    app.state.schema_heads = schema_heads()
    app.add_middleware(RequestContext, metrics=app.state.metrics)
    app.include_router(router)
