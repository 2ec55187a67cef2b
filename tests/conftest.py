"""Shared fixtures: isolated settings and databases (SQLite file, or a fresh PostgreSQL database)."""
from __future__ import annotations

import os
import uuid

import hypothesis
import pytest
from sqlalchemy import create_engine, text

from service.store.db import Database
from service.store.migrate import upgrade
from service.settings import Settings
from tests.support.data import HYMENOPTERA, PG_ADMIN_URL


# In CI the property tests and fuzzers replay the same examples each run (a red build is then
# reproducible); elsewhere they explore new ones.
hypothesis.settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")


def pytest_configure(config):
    if not HYMENOPTERA.is_dir():
        raise pytest.UsageError(f"the shared hymenoptera dataset is missing at {HYMENOPTERA}")


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings on a fresh data dir with a migrated SQLite database."""
    # Heartbeats every 2 s (re-queued after 6 s silent): at 0.5 s a worker loading torch on a loaded
    # 2-core machine missed three in a row and the API's reaper took its job away mid-test.
    s = Settings(data_dir=tmp_path / "data", heartbeat_interval_s=2.0, poll_interval_s=0.1,
                 retry_backoff_s=0.0)
    s.ensure_dirs()
    upgrade(s.database_url)
    return s


@pytest.fixture
def postgres_url():
    """A PostgreSQL database created for this test, migrated, and dropped afterwards."""
    name = f"graft_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # the server runs in every session and in CI: missing is a failure
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {exc}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def any_db_settings(request, tmp_path) -> Settings:
    """The same test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("settings")
    url = request.getfixturevalue("postgres_url")
    s = Settings(data_dir=tmp_path / "data", database_url=url, heartbeat_interval_s=2.0,
                 poll_interval_s=0.1, retry_backoff_s=0.0)
    s.ensure_dirs()
    return s


@pytest.fixture
def db(any_db_settings) -> Database:
    database = Database(any_db_settings.database_url)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (SeaweedFS): the one .ci/run started, or one for this session."""
    from tests.support.s3 import shared_endpoint

    endpoint, own = shared_endpoint()
    yield endpoint
    if own is not None:
        own.close()


@pytest.fixture
def s3_settings(s3_endpoint, tmp_path, monkeypatch) -> Settings:
    """Settings whose files live in the S3 server, under a prefix of this test's own; the data dir
    is only this machine's cache."""
    from tests.support.s3 import BUCKET, s3_env

    for name, value in s3_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    s = Settings(data_dir=tmp_path / "data", storage_url=f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}",
                 # 2 s heartbeats: a job is stale after 6 s. At 0.5 s a loaded CI machine re-queued a
                 # batch prediction while its worker was still fetching the model from the bucket.
                 heartbeat_interval_s=2.0, poll_interval_s=0.1, retry_backoff_s=0.0, storage_timeout_s=2.0,
                 storage_max_attempts=1, storage_retry_after_s=1.0)
    s.ensure_dirs()
    upgrade(s.database_url)
    return s
