"""Webhooks: a project's receivers of job and alias events, and every delivery attempt."""
from __future__ import annotations

import httpx
from fastapi import APIRouter, Query

from service.api.auth import AdminCaller
from service.api.deps import SessionDep, SettingsDep
from service.api.schemas import WebhookCreate, WebhookCreated, WebhookDeliveryOut, WebhookOut
from service.errors import InvalidInput
from service.webhooks import store
from service.webhooks.addresses import AddressPolicy, RefusedDestination, checked_addresses

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


def _check_url(url: str, policy: AddressPolicy) -> None:
    """422 for a URL that is not http(s) or that points at a refused address now; a name that does
    not resolve yet is accepted (every delivery checks again)."""
    try:
        checked_addresses(httpx.URL(url), policy)
    except (RefusedDestination, httpx.InvalidURL) as exc:
        raise InvalidInput(str(exc)) from None
    except OSError:
        pass


@router.post("", status_code=201)
def create_webhook(body: WebhookCreate, caller: AdminCaller, session: SessionDep,
                   settings: SettingsDep) -> WebhookCreated:
    """Register a receiver for some of `job.succeeded`, `job.failed`, `job.cancelled`, `alias.moved`.

    The answer holds the signing secret, shown this once."""
    _check_url(body.url, AddressPolicy.of(settings))
    hook = store.create_webhook(session, caller.project_id, body.url, [e.value for e in body.events])
    return WebhookCreated.model_validate({**WebhookOut.model_validate(hook).model_dump(), "secret": hook.secret})


@router.get("")
def list_webhooks(caller: AdminCaller, session: SessionDep) -> list[WebhookOut]:
    return [WebhookOut.model_validate(h) for h in store.list_webhooks(session, caller.project_id)]


@router.get("/{webhook_id}")
def get_webhook(webhook_id: str, caller: AdminCaller, session: SessionDep) -> WebhookOut:
    return WebhookOut.model_validate(store.webhook_of_project(session, caller.project_id, webhook_id))


@router.delete("/{webhook_id}", status_code=204)
def delete_webhook(webhook_id: str, caller: AdminCaller, session: SessionDep) -> None:
    """Its pending deliveries are dropped with it."""
    store.delete_webhook(session, store.webhook_of_project(session, caller.project_id, webhook_id))


@router.get("/{webhook_id}/deliveries")
def list_deliveries(webhook_id: str, caller: AdminCaller, session: SessionDep,
                    limit: int = Query(50, ge=1, le=500)) -> list[WebhookDeliveryOut]:
    """The latest deliveries, newest first, each with every attempt: when, the receiver's status code
    or the error, how long it took, and when the next retry is due."""
    hook = store.webhook_of_project(session, caller.project_id, webhook_id)
    return [WebhookDeliveryOut.model_validate({
        **{k: getattr(d, k) for k in ("id", "event", "status", "created_at")},
        "next_attempt_at": d.next_attempt_at if d.status == "pending" else None,
        "attempts": attempts}) for d, attempts in store.deliveries_of(session, hook.id, limit)]
