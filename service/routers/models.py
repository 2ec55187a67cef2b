from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, UploadFile
from sqlalchemy.orm import Session

from service.catalog import get_or_404, list_rows
from service.deps import ModelCacheDep, SessionDep, SettingsDep
from service.errors import Conflict, InvalidInput, NotFound
from service.predictor import predict
from service.routers._multipart import require_multipart
from service.schemas import ModelOut, PredictResponse
from service.tables import Job, Model
from workers.artifacts import ArtifactCorrupt

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_models(session: SessionDep, limit: Annotated[int, Query(ge=1, le=500)] = 100,
                offset: Annotated[int, Query(ge=0)] = 0) -> list[ModelOut]:
    """Trained models, newest first."""
    return [ModelOut.model_validate(m) for m in list_rows(session, Model, limit, offset)]


@router.get("/{model_id}")
def get_model(model_id: str, session: SessionDep) -> ModelOut:
    return ModelOut.model_validate(get_or_404(session, Model, model_id, "model"))


@router.post("/{model_id}/predict", dependencies=[Depends(require_multipart)])
def predict_images(model_id: str, session: SessionDep, cache: ModelCacheDep, settings: SettingsDep,
                   file: Annotated[list[UploadFile], File(description="one or more images")],
                   top_k: Annotated[int, Query(ge=1, le=1000)] = 5) -> PredictResponse:
    """Class probabilities for each uploaded image, in upload order. A job id works once it succeeded."""
    row = _ready_model(session, model_id)
    if len(file) > settings.max_predict_files:
        raise InvalidInput(f"{len(file)} files sent; at most {settings.max_predict_files} per request")
    files = [(f.filename or f"file{i}", f.file.read()) for i, f in enumerate(file)]
    try:
        loaded = cache.get(row)
    except ArtifactCorrupt:
        raise Conflict(f"model {row.id}'s stored file failed its sha256 check; retrain it") from None
    return PredictResponse(model_id=row.id, results=predict(loaded, files, top_k))


def _ready_model(session: Session, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is not None:
        return model
    job = session.get(Job, model_id)
    if job is None:
        raise NotFound(f"no model with id {model_id!r}")
    if job.model_id:
        return get_or_404(session, Model, job.model_id, "model")
    raise Conflict(f"{model_id!r} is a job that is {job.status}; its model is not ready"
                   + (" and never will be" if job.status in ("failed", "cancelled") else ""),
                   job_status=job.status)
