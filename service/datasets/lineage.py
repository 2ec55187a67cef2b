"""Which model a job may train on from (`base_model_id`), checked when the job is created."""
from __future__ import annotations

from sqlalchemy.orm import Session

from service.datasets.catalog import ready_model
from service.errors import InvalidInput


def with_base_model(session: Session, body, project_id: str):
    """The job request (a JobCreate) with its base model resolved: a model of the caller's project
    (another project's answers 404, an unfinished job's 409, as predict does) on the job's backbone;
    the backbone and image size the request leaves out are the base model's. Returns a new request,
    or `body` itself when it names no base model."""
    if body.base_model_id is None:
        return body
    base = ready_model(session, body.base_model_id, project_id)
    given = set(body._given)
    if "backbone" in given and body.backbone != base.backbone:
        raise InvalidInput(
            f"base model {base.id} is a {base.backbone} model and this job asks for backbone {body.backbone!r}: "
            f"a job starts from a model's weights on that model's backbone only; leave backbone out or set it "
            f"to {base.backbone!r} (or train from ImageNet without base_model_id)",
            base_model_backbone=base.backbone)
    fields = body.model_dump(include=given)
    fields.update(base_model_id=base.id, backbone=base.backbone)  # a job id names its model from here on
    if "image_size" not in given and (base.recipe or {}).get("image_size"):
        fields["image_size"] = base.recipe["image_size"]
    return type(body).model_validate(fields)
