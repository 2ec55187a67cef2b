"""Who is calling and what they may touch: operators, projects, API keys, scopes, rate limits.

Keys are 256 random bits shown once; the database keeps only their SHA-256 and a short display
prefix. Scopes nest: `admin` (the project's keys) includes `train` (datasets, jobs, models), which
includes `predict`. Every object belongs to a project and every lookup is filtered by the
caller's project, so another project's ids answer 404, exactly like ids that do not exist.

Above projects stands the server's operator: only an operator key (`graft keys create
--operator`, made on the server's machine) creates, re-quotas and deletes projects and sees every
project and worker. Where Graft runs open (no keys), a request without credentials is the
operator: whoever reaches an open server already controls all of it.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from service.api.deps import DatabaseDep, SettingsDep
from service.enums import Scope
from service.store.db import utcnow
from service.datasets.names import clean_text, name_key
from service.errors import Conflict, Forbidden, InvalidInput, TooManyRequests, Unauthorized
from service.settings import Settings
from service.store import aliases as aliases_store
from service.store.tables import DEFAULT_PROJECT_ID, ApiKey, Project

KEY_PREFIX = "graft_"
log = logging.getLogger("graft.api")

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
    project_id: str  # an operator's is its home project: the default one
    scopes: frozenset[str]
    key_id: str | None = None
    operator: bool = False
    aliases: frozenset[str] | None = None  # a predict key limited to these aliases; None: any model

    def require(self, scope: str) -> "Caller":
        if scope not in self.scopes:
            raise Forbidden(f"this API key has scope(s) {', '.join(sorted(self.scopes))}; "
                            f"this request needs '{scope}'")
        return self

    def require_any_model(self) -> "Caller":
        """Predict by model id: refused to a key limited to aliases."""
        if self.aliases is not None:
            raise Forbidden(f"this API key may predict only through the alias(es) {', '.join(sorted(self.aliases))}: "
                            "POST /v1/aliases/{name}/predict")
        return self

    def require_alias(self, name: str) -> "Caller":
        if self.aliases is not None and name not in self.aliases:
            raise Forbidden(f"this API key may not predict through alias {name!r}; it may through "
                            f"{', '.join(sorted(self.aliases))}")
        return self

    def require_operator(self) -> "Caller":
        if not self.operator:
            raise Forbidden("only the server's operator may do this (a key made on the server with "
                            "`graft keys create --operator`); a project's admin manages its own keys")
        return self


OPEN_CALLER = Caller(DEFAULT_PROJECT_ID, GRANTS[Scope.admin], operator=True)


def authenticate(settings: SettingsDep, db: DatabaseDep,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    if credentials is None:
        if auth_is_open(settings):
            return OPEN_CALLER
        raise Unauthorized("an API key is required: send `Authorization: Bearer <key>`")
    return caller_of_key(db, credentials.credentials)


def caller_of_key(db, plaintext: str) -> Caller:
    """The caller a key stands for; 401 for an unknown or revoked one."""
    digest = hash_key(plaintext)
    with db.session(readonly=True) as s:  # every request: a read that never waits for a writer
        key = s.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if key is None or not hmac.compare_digest(key.key_hash, digest) or key.revoked_at is not None:
        raise Unauthorized("this API key is not valid (unknown or revoked)")
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        with db.session() as s:  # at most once a minute per key
            s.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    return Caller(key.project_id, GRANTS[key.scope], key.id, operator=key.operator,
                  aliases=None if key.aliases is None else frozenset(key.aliases))


def still_valid(session, caller: Caller) -> bool:
    """For long-lived requests (event streams, downloads), asked again as they go: the key is not
    revoked and its project still exists."""
    if caller.key_id is None:
        return session.get(Project, caller.project_id) is not None
    key = session.get(ApiKey, caller.key_id)
    return key is not None and key.revoked_at is None and session.get(Project, key.project_id) is not None


def require(scope: str):
    def dependency(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
        return caller.require(scope)
    return Depends(dependency)


def _operator(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    return caller.require_operator()


AdminCaller = Annotated[Caller, require("admin")]
OperatorCaller = Annotated[Caller, Depends(_operator)]
TrainCaller = Annotated[Caller, require("train")]
PredictCaller = Annotated[Caller, require("predict")]


class RateLimiter:
    """Per (project, kind): at most `per_minute` requests in any 60 s (a moving window, the `limits`
    library). Counted where GRAFT_RATE_LIMIT_STORAGE says: memory:// in this API process, or
    redis://… shared by every process and replica. A limiter store that cannot be reached lets
    requests through (logged): an outage of the counter must not stop predictions."""

    WARN_EVERY_S = 30.0

    def __init__(self, storage_uri: str = "memory://"):
        from limits.storage import storage_from_string
        from limits.strategies import MovingWindowRateLimiter

        options = {"key_prefix": "graft", "wrap_exceptions": True, "socket_timeout": 1.0,
                   "socket_connect_timeout": 1.0} if storage_uri.startswith(("redis", "rediss")) else {}
        self.storage = storage_from_string(storage_uri, **options)
        self._limiter = MovingWindowRateLimiter(self.storage)
        self._warned_at = 0.0

    def hit(self, project_id: str, kind: str, per_minute: int) -> None:
        from limits import RateLimitItemPerMinute
        from limits.errors import StorageError

        if per_minute <= 0:
            return
        item = RateLimitItemPerMinute(per_minute)
        try:
            if self._limiter.hit(item, project_id, kind):
                return
            reset_at = self._limiter.get_window_stats(item, project_id, kind).reset_time
        except StorageError as exc:
            if time.monotonic() - self._warned_at > self.WARN_EVERY_S:
                self._warned_at = time.monotonic()
                log.warning("rate limits not counted: the limiter store is unreachable (%s)", exc,
                            extra={"action": "rate_limit_store_down"})
            return
        retry = max(1, math.ceil(reset_at - time.time()))
        raise TooManyRequests(f"rate limit of {per_minute} {kind} requests a minute reached; "
                              f"retry in {retry} s", headers={"Retry-After": str(retry)})


def project_named(session, name: str) -> Project | None:
    """The project whose name reads the same as `name` to a person ('Beta' finds 'beta')."""
    return session.scalar(select(Project).where(Project.name_key == name_key(name)))


def create_project(session, name: str, quotas: dict | None = None) -> Project:
    """Only operators reach this, so saying which name is taken tells no tenant anything."""
    name = clean_text(name, 100)
    if not name_key(name):
        raise InvalidInput(f"project name {name!r} has no letters or digits; start it with one")
    existing = project_named(session, name)
    if existing is not None:
        raise Conflict(f"project name {name!r} is taken: a project named {existing.name!r} exists (names are "
                       "compared case-folded, trimmed and without trailing punctuation)")
    project = Project(name=name, name_key=name_key(name), quotas=quotas or {})
    session.add(project)
    try:
        session.flush()
    except IntegrityError:  # another operator created the same name since the check above
        raise Conflict(f"project name {name!r} is taken (created a moment ago)") from None
    return project


def create_key(session, project_id: str, name: str, scope: str, *, operator: bool = False,
               aliases: list[str] | None = None) -> tuple[ApiKey, str]:
    """A new key; the plaintext is returned once and never stored. `aliases` limits a predict key."""
    if aliases is not None:
        check_alias_restriction(session, project_id, scope, aliases)
    key, digest, prefix = new_key()
    row = ApiKey(project_id=project_id, name=name, prefix=prefix, key_hash=digest, scope=scope, operator=operator,
                 aliases=None if aliases is None else sorted(set(aliases)))
    session.add(row)
    session.flush()
    return row, key


def check_alias_restriction(session, project_id: str, scope: str, names: list[str]) -> None:
    """A restriction to aliases fits only a predict key, and names aliases the project has."""
    if scope != Scope.predict:
        raise InvalidInput(f"only predict keys may be limited to aliases; this key's scope is {Scope(scope).value!r}")
    if not names:
        raise InvalidInput("aliases: name at least one alias (omit it for a key that may use any model)")
    missing = aliases_store.missing_names(session, project_id, [aliases_store.check_name(n) for n in names])
    if missing:
        raise InvalidInput(f"no alias named {', '.join(map(repr, missing))} in this project; create it first "
                           "(PUT /v1/aliases/{name}) or name existing ones", missing=missing)
