"""The FastAPI application factory."""
from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api.auth import RateLimiter
from service.store.blobs import BlobStore, sweep_staging
from service.store.db import Database
from service.api.problems import install_error_handlers
from service.serving.exports import Exporter
from service.serving.engine import InferenceEngine
from service.api.limits import BodySizeLimit
from service.api.openapi import install_problem_docs
from service.api.observability import install_observability
from service.serving.model_cache import ModelCache
from service.store.queue import JobQueue
from service.api.routes import backbones, datasets, health, jobs, models, projects, workers
from service.api.routes import webhooks as webhooks_router
from service.api.routes import aliases as aliases_router
from service.api.routes import export as export_router
from service.api.routes import batch_predictions
from service.api.routes import insights as insights_router
from service.serving.insights import Insights
from service.api.routes import suggestions as suggestions_router
from service.serving.suggestions import Suggestions
from service.api.routes.dashboard import install_dashboard
from service.settings import Settings, get_settings
from service.webhooks.dispatcher import Dispatcher
from workers.backbone_registry import use_registry


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()
    app = FastAPI(title="Graft", version="0.1.0", lifespan=_lifespan,
                  description="Transfer learning on images as a service: upload labeled photos, "
                              "train a classifier on a pretrained backbone, predict over HTTP.\n\n"
                              "Send an API key as `Authorization: Bearer graft_...`. Where Graft runs without "
                              "keys (open mode), a request without an Authorization header acts as the default "
                              "project's admin; a request with one is checked as when keys are required, so "
                              "another scheme, an empty, unknown or revoked key is a 401 in either mode.")
    app.state.settings = settings
    use_registry(settings.backbone_registry_file)  # the operator's extra backbones: jobs may name them
    app.state.db = Database(settings.database_url)
    app.state.blobs = BlobStore.for_settings(settings)  # the data dir, or an S3 bucket + local cache
    app.state.inference = InferenceEngine(settings.predict_device, settings.predict_max_batch,
                                          settings.predict_batch_window_ms, settings.torch_threads,
                                          parallel=settings.predict_parallel)
    app.state.model_cache = ModelCache(settings, settings.model_cache_mb * 1024**2,
                                       allow_downloads=settings.allow_downloads,
                                       copy_bytes=app.state.inference.host_copy_bytes)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_storage)  # redis://: across processes
    app.state.queue = JobQueue(app.state.db, stale_after_s=settings.stale_after_s,
                               retry_backoff_s=settings.retry_backoff_s)
    install_error_handlers(app)
    install_problem_docs(app)  # every 4xx in the OpenAPI document is problem+json
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    app.state.exporter = Exporter(settings)
    app.state.insights = Insights(settings)  # held-out predictions and plots (issue 19)
    app.state.suggestions = Suggestions()  # active learning: features of unlabeled images (issue 16)
    install_observability(app)  # after BodySizeLimit: outermost, so even a 413 carries a request id
    app.include_router(export_router.router)
    install_dashboard(app)
    for router in (health.router, backbones.router, datasets.router, jobs.router, models.router,
                   workers.router, projects.router, aliases_router.router, batch_predictions.router):
        app.include_router(router)
    app.include_router(webhooks_router.router)
    app.include_router(insights_router.router)
    app.include_router(suggestions_router.router)
    logging.getLogger("graft").setLevel(logging.INFO)
    return app


def create_app_from_env() -> FastAPI:
    """The app of one of several API processes (`graft serve --api-processes N`): settings and the log
    format from the environment the supervisor set."""
    import os
    import sys

    from service.api.observability import configure_logging

    if sys.platform == "linux":  # gone with `graft serve`, even when it is SIGKILLed
        from service.cli.server import _die_with_parent

        _die_with_parent()
    configure_logging(os.environ.get("GRAFT_LOG_FORMAT", "auto"))
    return create_app(Settings())


@asynccontextmanager
async def _lifespan(app: FastAPI):
    settings = app.state.settings
    sweep_staging(settings.tmp_dir, settings.staging_max_age_s)  # what a killed server left mid-upload
    stop = threading.Event()
    if settings.reaper_in_api:
        threading.Thread(target=_reap_stalled_jobs, args=(app, stop), name="reaper", daemon=True).start()
    app.state.inference.start()
    dispatcher = Dispatcher(app.state.db, settings) if settings.webhook_dispatcher_in_api else None
    if dispatcher:
        dispatcher.start()  # webhooks leave from the API processes, never from a job's worker
    try:
        yield
    finally:
        stop.set()
        if dispatcher:
            dispatcher.stop()
        app.state.inference.stop()


def _reap_stalled_jobs(app: FastAPI, stop: threading.Event) -> None:
    """Re-queue jobs whose worker died, even when no other worker is left to notice."""
    log = logging.getLogger("graft.reaper")
    while not stop.wait(app.state.settings.heartbeat_interval_s):
        try:
            for job_id in app.state.queue.requeue_stale():
                log.warning("re-queued stalled job %s", job_id, extra={"action": "requeue_stale"})
        except Exception:
            log.warning("reaper pass failed", exc_info=True, extra={"action": "requeue_stale"})
