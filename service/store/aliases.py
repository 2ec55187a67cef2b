"""Aliases: a project's named pointers to its models, and every move of them (all the alias SQL).

A move is one transaction: the alias row (locked on PostgreSQL, so two moves of one alias queue
rather than interleave), its history row and the `alias.moved` webhook event commit together or
not at all. Predict reads the alias once, at the start of a request, so a request already running
finishes on the model it started with.
"""
from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import Conflict, InvalidInput, NotFound
from service.store.db import utcnow
from service.store.tables import AliasMove, Model, ModelAlias
from service.webhooks.outbox import enqueue_event

ALIAS_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
ALIAS_NAME_RULE = ("1 to 63 characters: lowercase letters, digits, '.', '_' or '-', starting with a letter "
                   "or digit (no '/')")


def check_name(name: str) -> str:
    """The name, if it is one an alias may have; a 422 that says what is allowed otherwise."""
    if not ALIAS_NAME.fullmatch(name):
        raise InvalidInput(f"alias name {name[:80]!r} is not allowed: use {ALIAS_NAME_RULE}",
                           pattern=f"^{ALIAS_NAME.pattern}$")
    return name


def find(session: Session, project_id: str, name: str, *, lock: bool = False) -> ModelAlias | None:
    query = select(ModelAlias).where(ModelAlias.project_id == project_id, ModelAlias.name == name)
    return session.scalar(query.with_for_update() if lock else query)


def get_or_404(session: Session, project_id: str, name: str) -> ModelAlias:
    """The caller's project's alias; another project's answers exactly like one that does not exist."""
    alias = find(session, project_id, check_name(name))
    if alias is None:
        raise NotFound(f"no alias named {name!r} in this project")
    return alias


def list_aliases(session: Session, project_id: str) -> list[ModelAlias]:
    return list(session.scalars(select(ModelAlias).where(ModelAlias.project_id == project_id)
                                .order_by(ModelAlias.name)))


def history(session: Session, project_id: str, name: str) -> list[AliasMove]:
    """Every move of the alias, oldest first; 404 for a name that never was an alias here."""
    moves = list(session.scalars(select(AliasMove).where(AliasMove.project_id == project_id,
                                                         AliasMove.alias == check_name(name))
                                 .order_by(AliasMove.id)))
    if not moves:
        raise NotFound(f"no alias named {name!r} in this project, now or before")
    return moves


def move(session: Session, project_id: str, name: str, model: Model, key_id: str | None) -> ModelAlias:
    """Point the alias at `model` (creating it), recording the move and its webhook event."""
    alias = find(session, project_id, check_name(name), lock=True)
    now = utcnow()
    if alias is None:
        alias = ModelAlias(project_id=project_id, name=name, model_id=model.id, created_at=now, updated_at=now)
        try:
            with session.begin_nested():  # two first moves at once: one creates, the other is told
                session.add(alias)
        except IntegrityError:
            raise Conflict(f"alias {name!r} was created by another request just now; retry") from None
        previous = None
    elif alias.model_id == model.id:  # a PUT again: nothing moved, nothing to record or announce
        return alias
    else:
        previous, alias.model_id, alias.updated_at = alias.model_id, model.id, now
    _record(session, project_id, name, previous, model.id, key_id, now)
    return alias


def remove(session: Session, project_id: str, name: str, key_id: str | None) -> ModelAlias:
    """Delete the alias; its history stays, ending in a move to nothing."""
    alias = find(session, project_id, check_name(name), lock=True)
    if alias is None:
        raise NotFound(f"no alias named {name!r} in this project")
    session.delete(alias)
    _record(session, project_id, name, alias.model_id, None, key_id, utcnow())
    return alias


def _record(session: Session, project_id: str, name: str, from_id: str | None, to_id: str | None,
            key_id: str | None, at) -> None:
    entry = AliasMove(project_id=project_id, alias=name, from_model_id=from_id, to_model_id=to_id,
                      key_id=key_id, moved_at=at)
    session.add(entry)
    session.flush()
    enqueue_event(session, project_id, "alias.moved", {
        "alias": name, "from_model_id": from_id, "to_model_id": to_id, "key_id": key_id,
        "moved_at": at.isoformat()})


def missing_names(session: Session, project_id: str, names: list[str]) -> list[str]:
    """The names that are not aliases of the project (for a key restricted to aliases)."""
    existing = set(session.scalars(select(ModelAlias.name).where(ModelAlias.project_id == project_id,
                                                                 ModelAlias.name.in_(names))))
    return [n for n in names if n not in existing]

