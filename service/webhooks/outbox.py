"""The outbox: an event becomes pending deliveries in the transaction that caused it.

The caller's transaction commits the event with its cause (a job's end, an alias's move) or
neither; the dispatcher sends it later, so no receiver can slow down or fail that transaction.
"""
from __future__ import annotations

import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.store.db import utcnow
from service.store.tables import Webhook, WebhookDelivery, new_id
from service.webhooks.events import DeliveryStatus, WebhookEvent


def event_body(event_id: str, event: str, project_id: str, data: dict) -> str:
    """The JSON a receiver gets: compact and key-ordered, signed exactly as stored."""
    return json.dumps({"event": event, "id": event_id, "created_at": utcnow().isoformat(),
                       "project_id": project_id, "data": data}, separators=(",", ":"), sort_keys=True,
                      default=str)


def enqueue_event(session: Session, project_id: str, event: str, payload: dict) -> None:
    """One pending delivery per webhook of the project subscribed to `event`; none: a no-op.

    All deliveries of one event share its id, so a receiver can drop duplicates.
    """
    event = WebhookEvent(event)  # a typo in a caller is a bug, not a silently lost event
    hooks = session.scalars(select(Webhook).where(Webhook.project_id == project_id)).all()
    subscribed = [hook for hook in hooks if event.value in hook.events]
    if not subscribed:
        return
    body = event_body(new_id(), event.value, project_id, payload)
    now = utcnow()
    for hook in subscribed:
        session.add(WebhookDelivery(webhook_id=hook.id, project_id=project_id, event=event.value, body=body,
                                    status=DeliveryStatus.pending, next_attempt_at=now))


JOB_EVENTS = {"succeeded": WebhookEvent.job_succeeded, "failed": WebhookEvent.job_failed,
              "cancelled": WebhookEvent.job_cancelled}


def enqueue_job_end(session: Session, project_id: str, job_id: str, status_event: dict) -> None:
    """The job's end as its webhook event; `status_event` is its last status event's data (status,
    model_id or error_code/error_message or reason). Other statuses (queued, running) send nothing."""
    event = JOB_EVENTS.get(str(status_event.get("status")))
    if event is not None:
        enqueue_event(session, project_id, event, {"job_id": job_id, **status_event})
