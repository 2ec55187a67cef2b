"""Request-scoped dependencies, as Annotated aliases the routers share."""
from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.blobs import BlobStore
from service.predictor import ModelCache
from service.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.db.session() as session:
        yield session


def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


def get_model_cache(request: Request) -> ModelCache:
    return request.app.state.model_cache


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
ModelCacheDep = Annotated[ModelCache, Depends(get_model_cache)]
