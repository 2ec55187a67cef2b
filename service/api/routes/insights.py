"""Seeing why: Grad-CAM explanations, the held-out predictions per image, plots, thumbnails."""
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Path, Query, Response, UploadFile

from service.api.auth import PredictCaller, TrainCaller
from service.api.deps import BlobsDep, ModelCacheDep, RateLimiterDep, ReadSessionDep, SessionDep, SettingsDep, app_state
from service.api.routes._multipart import require_multipart
from service.api.routes.models import count_predict
from service.api.schemas import EvaluationOut, ExplainResponse
from service.datasets.catalog import get_or_404, ready_model, stored_model_errors
from service.errors import InvalidInput, NotFound
from service.serving.explain import explain_images, explanation_json
from service.serving.insights import PLOTS, THUMBNAIL_SIDE, Insights, thumbnail
from service.store.tables import Dataset, DatasetImage
from sqlalchemy import select

router = APIRouter(tags=["insights"])
InsightsDep = Annotated[Insights, Depends(app_state("insights"))]
PNG = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}
JPEG = {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}


@router.post("/v1/models/{model_id}/explain", dependencies=[Depends(require_multipart)])
def explain(model_id: str, caller: PredictCaller, session: ReadSessionDep, cache: ModelCacheDep,
            settings: SettingsDep, limiter: RateLimiterDep,
            file: Annotated[list[UploadFile], File(description="one or more images")],
            label: Annotated[str | None, Form(max_length=1000, description="the label to explain; default: "
                                                                            "each image's top prediction")] = None,
            method: Annotated[Literal["gradcam", "gradcampp"], Query()] = "gradcam",
            raw: Annotated[bool, Query(description="also return the raw map of the last convolutional stage")] = False,
            ) -> ExplainResponse:
    """Where the model looks: a Grad-CAM (or Grad-CAM++) heatmap per image, as a PNG overlay on the crop
    the model sees. Counts as a prediction for the rate limit."""
    caller.require_any_model()
    count_predict(caller, session, settings, limiter)
    row = ready_model(session, model_id, caller.project_id)
    if len(file) > settings.max_predict_files:
        raise InvalidInput(f"{len(file)} files sent; at most {settings.max_predict_files} per request")
    files = [(f.filename or f"file{i}", f.file.read()) for i, f in enumerate(file)]
    with stored_model_errors(row.id):
        loaded = cache.get(row)
    target = None
    if label is not None:
        if label not in loaded.classes:
            raise InvalidInput(f"label {label[:100]!r} is not a class of model {row.id}; its classes are "
                               + ", ".join(loaded.classes[:50]))
        target = loaded.classes.index(label)
    explained = explain_images(loaded, files, target, method)
    return ExplainResponse(model_id=row.id, method=method,
                           results=[explanation_json(e, loaded.classes, name, raw)
                                    for e, (name, _) in zip(explained, files)])


@router.get("/v1/models/{model_id}/evaluation")
def evaluation(model_id: str, caller: TrainCaller, session: SessionDep, insights: InsightsDep,
               true: Annotated[str | None, Query(max_length=1000, description="only images of this true label")] = None,
               predicted: Annotated[str | None, Query(max_length=1000, description="only images predicted as this "
                                                                                    "label")] = None,
               correct: Annotated[bool | None, Query(description="only right (true) or wrong (false) predictions")]
               = None,
               subset: Annotated[Literal["validation", "test"], Query(description=(
                   "validation: the predictions the model's metrics and confusion matrix count; test: the test "
                   "split's, as /predict answers"))] = "validation",
               sort: Annotated[Literal["loss", "probability", "dataset"], Query()] = "loss",
               order: Annotated[Literal["desc", "asc"], Query()] = "desc",
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0) -> EvaluationOut:
    """The model's held-out predictions per image: by default the top losses first. `true` and
    `predicted` together are one cell of the confusion matrix."""
    row = ready_model(session, model_id, caller.project_id)
    document, rows = insights.rows(row, subset=subset, true_label=true, predicted_label=predicted,
                                   correct=correct, sort=sort, order=order)
    base = f"/v1/datasets/{row.dataset_id}/images"
    page = [{**r, "thumbnail": f"{base}/{r['image_id']}/thumbnail"} for r in rows[offset:offset + limit]]
    return EvaluationOut(model_id=row.id, dataset_id=row.dataset_id, predictions=document["predictions"],
                         subset=subset, total=len(rows), offset=offset, rows=page)


@router.get("/v1/models/{model_id}/plots/{name}", response_class=Response,
            responses={200: {**PNG, "description": f"the plot as a PNG; names: {', '.join(PLOTS)}"}})
def plot(model_id: str, caller: TrainCaller, session: SessionDep, insights: InsightsDep,
         name: Annotated[str, Path(max_length=100, description=", ".join(PLOTS))]) -> Response:
    """One of the model's plots (listed in the model's `plots`), drawn once and kept with the model."""
    row = ready_model(session, model_id, caller.project_id)
    return Response(insights.plot(row, name), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=86400"})


@router.get("/v1/datasets/{dataset_id}/images/{image_id}/thumbnail", response_class=Response,
            responses={200: {**JPEG, "description": "the image, at most `size` pixels on its longer side"}})
def image_thumbnail(dataset_id: str, caller: TrainCaller, session: SessionDep, blobs: BlobsDep,
                    image_id: Annotated[str, Path(max_length=200, description="the image's id (sha256)")],
                    size: Annotated[int, Query(ge=16, le=512)] = THUMBNAIL_SIDE) -> Response:
    """A small JPEG of one of the dataset's images (the version's own: a newer version may have lost it)."""
    dataset = get_or_404(session, Dataset, dataset_id, "dataset", caller.project_id)
    present = len(image_id) == 64 and "\x00" not in image_id and session.scalar(
        select(DatasetImage.id).where(DatasetImage.dataset_id == dataset.id, DatasetImage.sha256 == image_id).limit(1))
    if not present:
        raise NotFound(f"dataset {dataset.id} has no image with id {image_id[:80]!r}")
    try:
        data = blobs.read(image_id)
    except FileNotFoundError:
        raise NotFound(f"the bytes of image {image_id} are no longer stored") from None
    return Response(thumbnail(data, size), media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=86400"})
