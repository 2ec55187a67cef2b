"""Schemathesis against Graft's own OpenAPI document, in-process, over every operation: whatever
it generates, no 5xx, and every response (errors included) matches the documented status codes,
media types and schemas, on SQLite and on PostgreSQL. Bounded: EXAMPLES cases per operation and
database in the fuzzing phase (the run size CI uses), plus schemathesis' examples/coverage cases."""
from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from hypothesis import HealthCheck, settings as hsettings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from service.app import create_app
from service.store.migrate import upgrade
from service.settings import Settings
from tests.support.data import PG_ADMIN_URL
from tests.support.ingest import class_folders, make_zip

EXAMPLES = 12
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _document() -> dict:
    """The OpenAPI document, from an app on a throwaway data dir (collection must not need a DB)."""
    with tempfile.TemporaryDirectory() as root:
        app = create_app(Settings(data_dir=Path(root) / "data"))
        document = app.openapi()
        app.state.db.dispose()
    return document


schema = schemathesis.openapi.from_dict(_document())


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def app(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("schemathesis")
    database_url = ""
    if request.param == "postgres":  # NUL bytes and integer ranges fail differently there
        name = f"graft_schema_{uuid.uuid4().hex[:12]}"
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        database_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    settings = Settings(data_dir=root / "data", database_url=database_url, max_upload_bytes=2 * 1024**2)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    app = create_app(settings)
    with TestClient(app) as client:  # one real dataset, so ids that exist are tried too
        resp = client.post("/v1/datasets", files={"file": ("s.zip", make_zip(class_folders({"a": 5, "b": 5})))})
        assert resp.status_code == 201, resp.text
        yield app
    app.state.db.dispose()
    if database_url:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@schema.parametrize()
@hsettings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_without_5xx_and_as_documented(case, app):
    case.call_and_validate(checks=CHECKS, app=app)
