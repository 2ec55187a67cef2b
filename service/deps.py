"""Request-scoped dependencies, as Annotated aliases the routers share."""
from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.auth import RateLimiter
from service.blobs import BlobStore
from service.predictor import ModelCache
from service.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    # GETs only read: on SQLite they then never queue behind (or block) a writer.
    with request.app.state.db.session(readonly=request.method in ("GET", "HEAD")) as session:
        yield session


def get_read_session(request: Request) -> Iterator[Session]:
    """For requests that only read but are not GETs (predict)."""
    with request.app.state.db.session(readonly=True) as session:
        yield session


def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


def get_model_cache(request: Request) -> ModelCache:
    return request.app.state.model_cache


def get_rate_limiter(request: Request) -> RateLimiter:
    return request.app.state.rate_limiter


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
ModelCacheDep = Annotated[ModelCache, Depends(get_model_cache)]
RateLimiterDep = Annotated[RateLimiter, Depends(get_rate_limiter)]
