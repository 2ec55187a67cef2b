"""The FastAPI application factory."""
from __future__ import annotations

import logging

from fastapi import FastAPI

from service.blobs import BlobStore
from service.db import Database
from service.errors import install_error_handlers
from service.limits import BodySizeLimit
from service.predictor import ModelCache
from service.routers import backbones, datasets, health, jobs, models
from service.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()
    app = FastAPI(title="Graft", version="0.1.0",
                  description="Transfer learning on images as a service: upload labeled photos, "
                              "train a classifier on a pretrained backbone, predict over HTTP.")
    app.state.settings = settings
    app.state.db = Database(settings.database_url)
    app.state.blobs = BlobStore(settings.blobs_dir)
    app.state.model_cache = ModelCache(settings.data_dir, settings.model_cache_size)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    for router in (health.router, backbones.router, datasets.router, jobs.router, models.router):
        app.include_router(router)
    logging.getLogger("graft").setLevel(logging.INFO)
    return app
