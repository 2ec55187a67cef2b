"""The dispatcher: a thread in each API process that sends due deliveries from the outbox.

It polls with a cheap read, claims due deliveries for a lease (store.claim_due: replicas never
send one at the same time), sends each on a small thread pool so one slow receiver does not hold
up the others, and records every attempt. A lost claim (the lease ran out mid-send) can mean a
second send: receivers deduplicate by the event's id.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from service.settings import Settings
from service.store.db import Database
from service.webhooks import store
from service.webhooks.addresses import AddressPolicy
from service.webhooks.delivery import MAX_REDIRECTS, new_client, send

log = logging.getLogger("graft.webhooks")


class Dispatcher:
    def __init__(self, db: Database, settings: Settings):
        self.db = db
        self.settings = settings
        self._stop = threading.Event()
        self._slots = threading.Semaphore(settings.webhook_concurrency)
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="webhook")
        self._client = new_client()
        self.policy = AddressPolicy.of(settings)
        self._thread = threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True)

    @property
    def lease_s(self) -> float:
        """Longer than the longest send (every hop timing out), so a claim outlives its attempt."""
        return self.settings.webhook_timeout_s * (MAX_REDIRECTS + 1) * 2 + 10

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.webhook_poll_s):
            try:
                self.dispatch_due()
            except Exception:
                log.warning("webhook dispatch pass failed", exc_info=True, extra={"action": "webhook_dispatch"})

    def dispatch_due(self) -> int:
        """Claim as many due deliveries as there are free senders and hand them out; returns how many."""
        free = 0
        while self._slots.acquire(blocking=False):
            free += 1
        claims: list[store.ClaimedDelivery] = []
        try:
            if free and store.has_due(self.db):
                claims = store.claim_due(self.db, free, self.lease_s)
        finally:
            for _ in range(free - len(claims)):
                self._slots.release()
        for claim in claims:
            self._pool.submit(self._deliver, claim)
        return len(claims)

    def _deliver(self, claim: store.ClaimedDelivery) -> None:
        try:
            s = self.settings
            outcome = send(self._client, claim.url, secret=claim.secret, body=claim.body,
                           headers={"Graft-Event": claim.event, "Graft-Delivery": claim.id},
                           policy=self.policy, timeout_s=s.webhook_timeout_s)
            status = store.record_attempt(self.db, claim, outcome, max_attempts=s.webhook_max_attempts,
                                          backoff_base_s=s.webhook_backoff_s, backoff_cap_s=s.webhook_max_backoff_s)
            level = logging.INFO if outcome.ok else logging.WARNING
            log.log(level, "webhook %s %s attempt %d: %s", claim.webhook_id, claim.event, claim.attempt,
                    outcome.error or outcome.status_code,
                    extra={"action": "webhook_delivery", "delivery_id": claim.id, "status": status})
        except Exception:
            log.warning("webhook delivery %s failed to run", claim.id, exc_info=True,
                        extra={"action": "webhook_delivery"})
        finally:
            self._slots.release()
