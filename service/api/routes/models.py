from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, UploadFile

from service.api import quotas
from service.api.auth import Caller, PredictCaller, RateLimiter, TrainCaller
from service.datasets.catalog import get_or_404, list_rows, ready_model, stored_model_errors
from service.api.deps import InferenceDep, ModelCacheDep, RateLimiterDep, ReadSessionDep, SessionDep, SettingsDep
from service.errors import InvalidInput
from service.serving.engine import InferenceEngine
from service.serving.model_cache import ModelCache, predict
from service.settings import Settings
from service.api.routes._multipart import require_multipart
from service.api.schemas import ModelOut, PredictResponse
from service.store.tables import Model
from workers.ood import check_min_score

router = APIRouter(prefix="/v1/models", tags=["models"])
# Issue 17: a per-request threshold for "none of these" (checked against the model's score kind once loaded).
MinScore = Annotated[float | None, Query(description=(
    "answer unknown (label null) below this out-of-distribution score instead of the model's own threshold; "
    "in the range of the model's score kind (cosine: -1 to 1, max_probability: 0 to 1, energy: any number)"))]


@router.get("")
def list_models(caller: TrainCaller, session: SessionDep, limit: Annotated[int, Query(ge=1, le=500)] = 100,
                offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0) -> list[ModelOut]:
    """Trained models, newest first."""
    return [ModelOut.model_validate(m) for m in list_rows(session, Model, caller.project_id, limit, offset)]


@router.get("/{model_id}")
def get_model(model_id: str, caller: TrainCaller, session: SessionDep) -> ModelOut:
    return ModelOut.model_validate(get_or_404(session, Model, model_id, "model", caller.project_id))


@router.post("/{model_id}/predict", dependencies=[Depends(require_multipart)])
def predict_images(model_id: str, caller: PredictCaller, session: ReadSessionDep, cache: ModelCacheDep,
                   settings: SettingsDep, limiter: RateLimiterDep, engine: InferenceDep,
                   file: Annotated[list[UploadFile], File(description="one or more images")],
                   top_k: Annotated[int, Query(ge=1, le=1000)] = 5,
                   min_score: MinScore = None) -> PredictResponse:
    """Class probabilities for each uploaded image, in upload order. A job id works once it succeeded."""
    caller.require_any_model()
    count_predict(caller, session, settings, limiter)
    row = ready_model(session, model_id, caller.project_id)
    return PredictResponse(model_id=row.id, results=predict_files(row, file, top_k, cache, engine, settings, min_score))


def count_predict(caller: Caller, session, settings: Settings, limiter: RateLimiter) -> None:
    """The project's predict rate limit: by id and by alias alike."""
    limiter.hit(caller.project_id, "predict",
                quotas.quota(session, settings, caller.project_id, "predict_rate_per_minute"))


def predict_files(row: Model, file: list[UploadFile], top_k: int, cache: ModelCache, engine: InferenceEngine,
                  settings: Settings, min_score: float | None = None) -> list[dict]:
    """What predict by id and by alias share once the model is chosen: the uploads read, the model
    loaded (from the cache), the results in upload order."""
    if len(file) > settings.max_predict_files:
        raise InvalidInput(f"{len(file)} files sent; at most {settings.max_predict_files} per request")
    files = [(f.filename or f"file{i}", f.file.read()) for i, f in enumerate(file)]
    with stored_model_errors(row.id):
        loaded = cache.get(row)
    if (why := check_min_score(getattr(loaded.classifier, "ood", None), min_score, row.id)) is not None:
        raise InvalidInput(why)
    return predict(engine, loaded, files, top_k, min_score)
