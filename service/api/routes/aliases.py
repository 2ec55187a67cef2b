"""Aliases: stable names for a project's models (`prod`, `staging`), predict by name, every move kept.

The `{name:path}` routes take a name with '/' too, so that it is refused with a 422 that says what
a name may be, rather than a bare 404 from the router.
"""
from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, UploadFile

from service.api.auth import PredictCaller, TrainCaller
from service.api.deps import (InferenceDep, ModelCacheDep, RateLimiterDep, ReadSessionDep, SessionDep,
                              SettingsDep)
from service.api.routes._multipart import require_multipart
from service.api.routes.models import MinScore, count_predict, predict_files
from service.api.schemas import AliasMoveOut, AliasOut, AliasPredictResponse, AliasPut
from service.datasets.catalog import ready_model, stored_model_errors
from service.store import aliases
from service.store.tables import Model

router = APIRouter(prefix="/v1/aliases", tags=["aliases"])


@router.get("")
def list_aliases(caller: TrainCaller, session: SessionDep) -> list[AliasOut]:
    """The project's aliases, by name."""
    return [AliasOut.model_validate(a) for a in aliases.list_aliases(session, caller.project_id)]


@router.get("/{name:path}/history")
def alias_history(name: str, caller: TrainCaller, session: SessionDep) -> list[AliasMoveOut]:
    """Every move of the alias, oldest first: from, to, which key, when (kept after a delete)."""
    return [AliasMoveOut.model_validate(m) for m in aliases.history(session, caller.project_id, name)]


@router.post("/{name:path}/predict", dependencies=[Depends(require_multipart)])
def predict_through_alias(name: str, caller: PredictCaller, session: ReadSessionDep, cache: ModelCacheDep,
                          settings: SettingsDep, limiter: RateLimiterDep, engine: InferenceDep,
                          file: Annotated[list[UploadFile], File(description="one or more images")],
                          top_k: Annotated[int, Query(ge=1, le=1000)] = 5,
                          min_score: MinScore = None) -> AliasPredictResponse:
    """Predict as POST /v1/models/{id}/predict does, with the model the alias points at when this
    request starts (a move meanwhile does not change it); model_id names that model."""
    caller.require_alias(aliases.check_name(name))
    count_predict(caller, session, settings, limiter)
    row = session.get(Model, aliases.get_or_404(session, caller.project_id, name).model_id)
    return AliasPredictResponse(alias=name, model_id=row.id,
                                results=predict_files(row, file, top_k, cache, engine, settings, min_score))


@router.get("/{name:path}")
def get_alias(name: str, caller: TrainCaller, session: SessionDep) -> AliasOut:
    return AliasOut.model_validate(aliases.get_or_404(session, caller.project_id, name))


@router.put("/{name:path}")
def move_alias(name: str, body: AliasPut, caller: TrainCaller, session: SessionDep,
               cache: ModelCacheDep) -> AliasOut:
    """Point the alias at a ready model of the project, creating it if new. The model is loaded into
    the cache before the move commits, so no predict through the alias waits on a load."""
    aliases.check_name(name)
    row = ready_model(session, body.model_id, caller.project_id)
    with stored_model_errors(row.id):
        cache.get(row)
    return AliasOut.model_validate(aliases.move(session, caller.project_id, name, row, caller.key_id))


@router.delete("/{name:path}")
def delete_alias(name: str, caller: TrainCaller, session: SessionDep) -> AliasOut:
    """Remove the alias (its history stays); predicts through it then answer 404."""
    return AliasOut.model_validate(aliases.remove(session, caller.project_id, name, caller.key_id))
