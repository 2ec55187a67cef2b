"""Who is calling and what they may touch: projects, API keys, scopes, rate limits.

Keys are 256 random bits shown once; the database keeps only their SHA-256 and a short display
prefix. Scopes nest: `admin` (projects and keys) includes `train` (datasets, jobs, models), which
includes `predict`. Every object belongs to a project and every lookup is filtered by the
caller's project, so another project's ids answer 404, exactly like ids that do not exist.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select, update

from service.api.deps import DatabaseDep, SettingsDep
from service.enums import Scope
from service.store.db import utcnow
from service.errors import Conflict, Forbidden, TooManyRequests, Unauthorized
from service.settings import Settings
from service.store.tables import DEFAULT_PROJECT_ID, ApiKey, Project

KEY_PREFIX = "graft_"

GRANTS = {Scope.admin: frozenset(Scope), Scope.train: frozenset({Scope.train, Scope.predict}),
          Scope.predict: frozenset({Scope.predict})}
LAST_USED_RESOLUTION = timedelta(seconds=60)  # don't write on every request


class KeyBearer(HTTPBearer):
    """The caller's credential, judged alike whether keys are required or not: no Authorization header
    is None (the default project's admin where Graft runs open, else a 401), and any Authorization
    header is a claim to be checked. One that is not `Bearer <key>` (another scheme, an empty key,
    garbage) is a 401 here, and an unknown or revoked key a 401 in `authenticate`, so a mistyped key
    fails loudly instead of quietly running as the open mode's admin."""

    async def __call__(self, request: Request) -> HTTPAuthorizationCredentials | None:
        if "authorization" not in request.headers:
            return None
        credentials = await super().__call__(request)
        if credentials is None:  # never echo the header: it may hold a key without its `Bearer `
            raise Unauthorized("the Authorization header is not `Bearer <key>`: send a Graft API key as "
                               "`Authorization: Bearer graft_...` (where Graft runs without keys, send none)")
        return credentials


bearer = KeyBearer(auto_error=False, scheme_name="ApiKey",
                   description="A Graft API key: `Authorization: Bearer graft_...`")


def new_key() -> tuple[str, str, str]:
    """(the key, shown once; its SHA-256, stored; a display prefix, stored)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key), key[: len(KEY_PREFIX) + 6]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_is_open(settings: Settings) -> bool:
    """Open (no keys needed) only when asked for, or by default on a loopback address."""
    if settings.auth_required is not None:
        return not settings.auth_required
    return is_loopback(settings.host)


def check_exposure(settings: Settings) -> None:
    """Refuse to serve without keys on a non-loopback address unless explicitly overridden."""
    if auth_is_open(settings) and not is_loopback(settings.host) and not settings.allow_open_network:
        raise SystemExit(f"refusing to serve without API keys on {settings.host}: anyone on the network could "
                         "use it. Create a key (graft keys create --project NAME --scope admin) and set "
                         "GRAFT_AUTH_REQUIRED=1, or set GRAFT_ALLOW_OPEN_NETWORK=1 to run open anyway.")


@dataclass(frozen=True)
class Caller:
    project_id: str
    scopes: frozenset[str]
    key_id: str | None = None

    def require(self, scope: str) -> "Caller":
        if scope not in self.scopes:
            raise Forbidden(f"this API key has scope(s) {', '.join(sorted(self.scopes))}; "
                            f"this request needs '{scope}'")
        return self


def authenticate(settings: SettingsDep, db: DatabaseDep,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    if credentials is None:
        if auth_is_open(settings):
            return Caller(DEFAULT_PROJECT_ID, GRANTS[Scope.admin])
        raise Unauthorized("an API key is required: send `Authorization: Bearer <key>`")
    digest = hash_key(credentials.credentials)
    with db.session(readonly=True) as s:  # every request: a read that never waits for a writer
        key = s.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if key is None or not hmac.compare_digest(key.key_hash, digest) or key.revoked_at is not None:
        raise Unauthorized("this API key is not valid (unknown or revoked)")
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        with db.session() as s:  # at most once a minute per key
            s.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    return Caller(key.project_id, GRANTS[key.scope], key.id)


def require(scope: str):
    def dependency(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
        return caller.require(scope)
    return Depends(dependency)


AdminCaller = Annotated[Caller, require("admin")]
TrainCaller = Annotated[Caller, require("train")]
PredictCaller = Annotated[Caller, require("predict")]


class RateLimiter:
    """Token buckets per (project, kind), in this API process: `rate` requests a minute, bursts up to it."""

    def __init__(self):
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def hit(self, project_id: str, kind: str, per_minute: int) -> None:
        if per_minute <= 0:
            return
        rate = per_minute / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get((project_id, kind), (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * rate)
            if tokens < 1.0:
                retry = max(1, int((1.0 - tokens) / rate + 0.999))
                self._buckets[(project_id, kind)] = (tokens, now)
                raise TooManyRequests(f"rate limit of {per_minute} {kind} requests a minute reached; "
                                      f"retry in {retry} s", headers={"Retry-After": str(retry)})
            self._buckets[(project_id, kind)] = (tokens - 1.0, now)


def create_project(session, name: str, quotas: dict | None = None) -> Project:
    if session.scalar(select(Project).where(Project.name == name)) is not None:
        raise Conflict(f"a project named {name!r} exists already")
    project = Project(name=name, quotas=quotas or {})
    session.add(project)
    session.flush()
    return project


def create_key(session, project_id: str, name: str, scope: str) -> tuple[ApiKey, str]:
    """A new key; the plaintext is returned once and never stored."""
    key, digest, prefix = new_key()
    row = ApiKey(project_id=project_id, name=name, prefix=prefix, key_hash=digest, scope=scope)
    session.add(row)
    session.flush()
    return row, key
