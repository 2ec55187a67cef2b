"""Every SQL statement about webhooks: registrations, the outbox's claims, attempts."""
from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from service.errors import NotFound
from service.store.db import Database, utcnow
from service.store.tables import Webhook, WebhookAttempt, WebhookDelivery
from service.webhooks.delivery import Outcome
from service.webhooks.events import DeliveryStatus

SECRET_PREFIX = "whsec_"


# -- registrations (the API) -----------------------------------------------------------------
def create_webhook(session: Session, project_id: str, url: str, events: list[str]) -> Webhook:
    hook = Webhook(project_id=project_id, url=url, events=sorted(set(events)),
                   secret=SECRET_PREFIX + secrets.token_urlsafe(32))
    session.add(hook)
    session.flush()
    return hook


def list_webhooks(session: Session, project_id: str) -> list[Webhook]:
    return list(session.scalars(select(Webhook).where(Webhook.project_id == project_id)
                                .order_by(Webhook.created_at, Webhook.id)))


def webhook_of_project(session: Session, project_id: str, webhook_id: str) -> Webhook:
    """The project's webhook; another project's is as absent as one that never existed."""
    hook = session.get(Webhook, webhook_id)
    if hook is None or hook.project_id != project_id:
        raise NotFound(f"no webhook {webhook_id!r} in this project")
    return hook


def delete_webhook(session: Session, hook: Webhook) -> None:
    """Its deliveries and their attempts go with it (ON DELETE CASCADE): nothing more is sent."""
    session.delete(hook)


def deliveries_of(session: Session, webhook_id: str, limit: int) -> list[tuple[WebhookDelivery, list[WebhookAttempt]]]:
    """The webhook's latest deliveries, newest first, each with its attempts in order."""
    deliveries = list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
                                      .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id).limit(limit)))
    attempts: dict[str, list[WebhookAttempt]] = {d.id: [] for d in deliveries}
    if deliveries:
        for attempt in session.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(attempts))
                                       .order_by(WebhookAttempt.number)):
            attempts[attempt.delivery_id].append(attempt)
    return [(d, attempts[d.id]) for d in deliveries]


# -- the dispatcher ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClaimedDelivery:
    id: str
    claim_token: str
    webhook_id: str
    event: str
    url: str
    secret: str
    body: str
    attempt: int  # the number of the attempt about to be made


def _due(now):
    return and_(WebhookDelivery.status == DeliveryStatus.pending, WebhookDelivery.next_attempt_at <= now,
                or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until < now))


def has_due(db: Database) -> bool:
    """A read (no write lock on SQLite): the dispatcher polls with it and claims only when true."""
    with db.session(readonly=True) as s:
        return s.scalar(select(WebhookDelivery.id).where(_due(utcnow())).limit(1)) is not None


def claim_due(db: Database, limit: int, lease_s: float) -> list[ClaimedDelivery]:
    """Claim up to `limit` due deliveries for `lease_s`. The UPDATE re-checks that each is still
    due and unclaimed, so two dispatchers (API replicas) never both get one: on PostgreSQL the
    candidates are locked with SKIP LOCKED, on SQLite the claiming transaction holds the write lock."""
    now, token = utcnow(), secrets.token_hex(16)
    with db.session() as s:
        candidates = list(s.scalars(select(WebhookDelivery.id).where(_due(now))
                                    .order_by(WebhookDelivery.next_attempt_at).limit(limit)
                                    .with_for_update(skip_locked=True)))
        if not candidates:
            return []
        claimed = s.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(candidates), _due(now))
                            .values(claim_token=token, claimed_until=now + timedelta(seconds=lease_s))
                            .returning(WebhookDelivery.id).execution_options(synchronize_session=False)).scalars().all()
        rows = s.execute(select(WebhookDelivery, Webhook.url, Webhook.secret)
                         .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                         .where(WebhookDelivery.id.in_(claimed))).all()
        return [ClaimedDelivery(d.id, token, d.webhook_id, d.event, url, secret, d.body, d.attempts + 1)
                for d, url, secret in rows]


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """The wait after failed attempt number `attempt`: base * 2^(attempt-1), capped, with jitter in
    [half, all] so receivers that come back are not hit by every retry at the same moment."""
    return min(base_s * 2 ** max(0, attempt - 1), cap_s) * random.uniform(0.5, 1.0)


def record_attempt(db: Database, claim: ClaimedDelivery, outcome: Outcome, *, max_attempts: int,
                   backoff_base_s: float, backoff_cap_s: float) -> str | None:
    """Log the attempt and settle the delivery: succeeded, retried later, or failed (refused, or out of
    attempts). Only under the claim; returns the delivery's new status, None when the claim was lost."""
    now = utcnow()
    retry = not outcome.ok and not outcome.refused and claim.attempt < max_attempts
    next_at = now + timedelta(seconds=backoff_s(claim.attempt, backoff_base_s, backoff_cap_s)) if retry else None
    status = (DeliveryStatus.succeeded if outcome.ok else DeliveryStatus.pending if retry else DeliveryStatus.failed)
    with db.session() as s:
        res = s.execute(update(WebhookDelivery)
                        .where(WebhookDelivery.id == claim.id, WebhookDelivery.claim_token == claim.claim_token)
                        .values(status=status, attempts=claim.attempt, claim_token=None, claimed_until=None,
                                next_attempt_at=next_at or now, finished_at=None if retry else now)
                        .execution_options(synchronize_session=False))
        if res.rowcount != 1:
            return None  # the delivery was deleted (its webhook with it) or its claim expired
        s.add(WebhookAttempt(delivery_id=claim.id, number=claim.attempt, started_at=now - timedelta(
            milliseconds=outcome.duration_ms), duration_ms=outcome.duration_ms, status_code=outcome.status_code,
            error=outcome.error, next_retry_at=next_at))
    return status
