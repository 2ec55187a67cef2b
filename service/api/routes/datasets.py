from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Path, Query, UploadFile

from service.api import quotas
from service.datasets import catalog
from service.api.auth import TrainCaller
from service.api.deps import BlobsDep, RateLimiterDep, SessionDep, SettingsDep
from service.datasets.ingest import ingest_zip
from service.datasets.multilabel import shown_label
from service.datasets.names import clean_filename, clean_text
from service.api.routes._multipart import require_multipart
from service.api.schemas import DatasetImageOut, DatasetOut, DatasetReport, ImageLabel, ImageLabels
from service.store.tables import Dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

Split = Literal["train", "val", "test"]


def dataset_out(session, dataset: Dataset, settings) -> DatasetOut:
    fields = {name: getattr(dataset, name) for name in DatasetOut.model_fields if name != "report"}
    return DatasetOut.model_validate({**fields, "report": catalog.report_of(session, dataset, settings)})


@router.post("", status_code=201, dependencies=[Depends(require_multipart)])
def upload_dataset(caller: TrainCaller, session: SessionDep, blobs: BlobsDep, settings: SettingsDep,
                   limiter: RateLimiterDep,
                   file: Annotated[UploadFile, File(description="a zip of <label>/<image>, train|val/<label>/<image>, "
                                                                "or files listed in labels.csv / labels.jsonl")],
                   name: Annotated[str | None, Form(max_length=200)] = None) -> DatasetOut:
    """Upload a zip of labeled images; the answer carries the dataset report (every file left out, and why)."""
    limiter.hit(caller.project_id, "upload",
                quotas.quota(session, settings, caller.project_id, "upload_rate_per_minute"))
    quotas.check_new_dataset(session, settings, caller.project_id)
    with blobs.staging(settings.tmp_dir) as stage:
        result = ingest_zip(file.file, stage, settings)
        quotas.check_storage(session, settings, caller.project_id, sum(i.size_bytes for i in result.images))
        default_name = clean_filename(file.filename, "dataset").removesuffix(".zip")[:200] or "dataset"
        dataset = catalog.create_dataset(session, clean_text(name or "", 200) or default_name, result, settings,
                                         caller.project_id)
        stage.commit(img.sha256 for img in result.images)
    return dataset_out(session, dataset, settings)


@router.get("")
def list_datasets(caller: TrainCaller, session: SessionDep, settings: SettingsDep, limit: Annotated[int, Query(ge=1, le=500)] = 100,
                  offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0) -> list[DatasetOut]:
    """Datasets (every version), newest first."""
    return [dataset_out(session, d, settings) for d in catalog.list_rows(session, Dataset, caller.project_id, limit, offset)]


@router.get("/{dataset_id}")
def get_dataset(dataset_id: str, caller: TrainCaller, session: SessionDep, settings: SettingsDep) -> DatasetOut:
    return dataset_out(session, catalog.get_or_404(session, Dataset, dataset_id, "dataset", caller.project_id),
                       settings)


@router.get("/{dataset_id}/report")
def get_report(dataset_id: str, caller: TrainCaller, session: SessionDep, settings: SettingsDep) -> DatasetReport:
    """Counts, files left out and why, duplicates, conflicts, train/val leakage, warnings, trainable or not."""
    dataset = catalog.get_or_404(session, Dataset, dataset_id, "dataset", caller.project_id)
    return DatasetReport.model_validate(catalog.report_of(session, dataset, settings))


@router.get("/{dataset_id}/images")
def list_images(dataset_id: str, caller: TrainCaller, session: SessionDep, label: str | None = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
                unlabeled: Annotated[bool | None, Query(description="true: only unlabeled images; false: only "
                                                                    "labeled ones")] = None) -> list[DatasetImageOut]:
    """The dataset's images in upload order; an image's id is the sha256 of its bytes (label null: unlabeled)."""
    return [DatasetImageOut(id=row.sha256, label=shown_label(row) or None, labels=row.labels, split=row.split,
                            original_name=row.original_name,
                            width=row.width, height=row.height, mode=row.mode, format=row.format)
            for row in catalog.list_images(session, dataset_id, label, limit, offset, caller.project_id, unlabeled)]


@router.post("/{dataset_id}/images", dependencies=[Depends(require_multipart)])
def add_images(dataset_id: str, caller: TrainCaller, session: SessionDep, blobs: BlobsDep, settings: SettingsDep,
               limiter: RateLimiterDep,
               file: Annotated[list[UploadFile], File(description="one or more images")],
               label: Annotated[str | None, Form(min_length=1, max_length=1000, description=(
                   "the images' class; leave it out to add them unlabeled (label them later with PATCH)"))] = None,
               split: Annotated[Split | None, Form()] = None) -> DatasetOut:
    """Add images under one label, or unlabeled. A dataset a job has used is frozen: the answer is then its
    next version."""
    limiter.hit(caller.project_id, "upload",
                quotas.quota(session, settings, caller.project_id, "upload_rate_per_minute"))
    with blobs.staging(settings.tmp_dir) as stage:
        dataset, result = catalog.add_images(session, stage, dataset_id, ((f.filename, f.file) for f in file),
                                             label, split, settings, caller.project_id)
        quotas.check_storage(session, settings, caller.project_id, 0)  # counts the rows just added; rolls back
        stage.commit(img.sha256 for img in result.images)
    return dataset_out(session, dataset, settings)


@router.delete("/{dataset_id}/images/{image_id}")
def remove_image(dataset_id: str, caller: TrainCaller, session: SessionDep, settings: SettingsDep,
                 image_id: Annotated[str, Path(description="the image's id (sha256) from GET .../images")]) -> DatasetOut:
    """Remove one image. A dataset a job has used is frozen: the answer is then its next version."""
    return dataset_out(session, catalog.remove_image(session, dataset_id, image_id, settings, caller.project_id),
                       settings)


@router.patch("/{dataset_id}/images/{image_id}")
def label_image(dataset_id: str, body: ImageLabel, caller: TrainCaller, session: SessionDep, settings: SettingsDep,
                image_id: Annotated[str, Path(description="the image's id (sha256) from GET .../images")]) -> DatasetOut:
    """Label one image (or unlabel it: null). A dataset a job has used is frozen: the answer is then its next version."""
    return dataset_out(session, catalog.label_images(session, dataset_id, [(image_id, body.label)], body.create_class,
                                                     settings, caller.project_id), settings)


@router.patch("/{dataset_id}/images")
def label_images(dataset_id: str, body: ImageLabels, caller: TrainCaller, session: SessionDep,
                 settings: SettingsDep) -> DatasetOut:
    """Label several images in one change (one new version at most, when a job has used the dataset)."""
    changes = [(change.id, change.label) for change in body.images]
    return dataset_out(session, catalog.label_images(session, dataset_id, changes, body.create_class, settings,
                                                     caller.project_id), settings)
