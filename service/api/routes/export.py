from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from service.api.auth import TrainCaller
from service.api.downloads import file_while_key_valid
from service.api.deps import DatabaseDep, ExporterDep
from service.datasets.catalog import ready_model, stored_model_errors
from service.enums import ExportFormat

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("/{model_id}/export", response_class=FileResponse,
            responses={200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "a zip: the model file, manifest.json and USAGE.md"}})
def export_model(model_id: str, db: DatabaseDep, exporter: ExporterDep, caller: TrainCaller,
                 format: Annotated[ExportFormat, Query(description="onnx | safetensors | torchscript")]
                 = ExportFormat.onnx):
    """The model as ONNX, safetensors or TorchScript, with its preprocessing manifest, as a zip."""
    # A short transaction: an export can take seconds, and on SQLite every transaction holds the lock.
    with db.session() as session:
        row = ready_model(session, model_id, caller.project_id)
    with stored_model_errors(row.id):
        path = exporter.export(row, format)
    return file_while_key_valid(path, db, caller, "application/zip", f"graft-{row.id}-{format}.zip")
