from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile

from service.catalog import create_dataset, get_or_404, list_rows
from service.deps import BlobsDep, SessionDep, SettingsDep
from service.ingest import ingest_zip
from service.routers._multipart import require_multipart
from service.schemas import DatasetOut
from service.tables import Dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, dependencies=[Depends(require_multipart)])
def upload_dataset(session: SessionDep, blobs: BlobsDep, settings: SettingsDep,
                   file: Annotated[UploadFile, File(description="a zip of <label>/<image> or train|val/<label>/<image>")],
                   name: Annotated[str | None, Form(max_length=200)] = None) -> DatasetOut:
    """Upload a zip of labeled images; unusable files are skipped and listed in `rejected`."""
    result = ingest_zip(file.file, blobs, settings)
    default_name = (file.filename or "dataset").rsplit("/", 1)[-1].removesuffix(".zip")[:200]
    dataset = create_dataset(session, (name or "").strip() or default_name, result)
    return DatasetOut.model_validate(dataset)


@router.get("")
def list_datasets(session: SessionDep, limit: Annotated[int, Query(ge=1, le=500)] = 100,
                  offset: Annotated[int, Query(ge=0)] = 0) -> list[DatasetOut]:
    """Datasets, newest first."""
    return [DatasetOut.model_validate(d) for d in list_rows(session, Dataset, limit, offset)]


@router.get("/{dataset_id}")
def get_dataset(dataset_id: str, session: SessionDep) -> DatasetOut:
    return DatasetOut.model_validate(get_or_404(session, Dataset, dataset_id, "dataset"))
