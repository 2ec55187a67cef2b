"""Active learning (issue 16): the unlabeled images a model would most like labeled next."""
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from service.api.auth import TrainCaller
from service.api.deps import BlobsDep, InferenceDep, ModelCacheDep, SessionDep, app_state
from service.api.schemas import SuggestionsOut
from service.datasets.catalog import get_or_404, latest_version, ready_model, stored_model_errors
from service.datasets.ingest import UNLABELED
from service.serving.suggestions import Candidate, Suggestions, suggest
from service.store.tables import Dataset, DatasetImage

router = APIRouter(tags=["active learning"])
SuggestionsDep = Annotated[Suggestions, Depends(app_state("suggestions"))]


@router.get("/v1/models/{model_id}/suggestions")
def suggestions(model_id: str, caller: TrainCaller, session: SessionDep, cache: ModelCacheDep, engine: InferenceDep,
                blobs: BlobsDep, kept: SuggestionsDep,
                dataset_id: Annotated[str | None, Query(max_length=200, description=(
                    "the dataset whose unlabeled images to rank; default: the newest version of the model's"))] = None,
                k: Annotated[int, Query(ge=1, le=500, description="how many suggestions")] = 20,
                strategy: Annotated[Literal["margin", "entropy", "diverse"], Query(description=(
                    "margin: smallest gap between the two likeliest classes first; entropy: most uncertain "
                    "first; diverse: uncertain and unlike each other (k-center on the backbone's features, "
                    "no perceptual near-duplicates)"))] = "margin") -> SuggestionsOut:
    """The dataset's unlabeled images to label first, each with the model's guess (a pre-label)."""
    row = ready_model(session, model_id, caller.project_id)
    if dataset_id is None:
        dataset = latest_version(session, get_or_404(session, Dataset, row.dataset_id, "dataset", caller.project_id))
    else:
        dataset = get_or_404(session, Dataset, dataset_id, "dataset", caller.project_id)
    images = session.execute(select(DatasetImage.sha256, DatasetImage.original_name, DatasetImage.phash)
                             .where(DatasetImage.dataset_id == dataset.id, DatasetImage.label == UNLABELED)
                             .order_by(DatasetImage.id)).all()
    with stored_model_errors(row.id):
        loaded = cache.get(row)
    answer = suggest(engine, kept, loaded, row.sha256, [Candidate(*image) for image in images], blobs.read,
                     strategy, k)
    base = f"/v1/datasets/{dataset.id}/images"
    for s in answer["suggestions"]:
        s["thumbnail"] = f"{base}/{s['image_id']}/thumbnail"
    return SuggestionsOut(model_id=row.id, dataset_id=dataset.id, dataset_version=dataset.version, strategy=strategy,
                          **answer)
