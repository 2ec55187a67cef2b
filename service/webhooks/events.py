"""The events a webhook can subscribe to, and the states of a delivery."""
from __future__ import annotations

from enum import StrEnum


class WebhookEvent(StrEnum):
    job_succeeded = "job.succeeded"
    job_failed = "job.failed"
    job_cancelled = "job.cancelled"
    alias_moved = "alias.moved"


class DeliveryStatus(StrEnum):
    pending = "pending"  # waiting for its next attempt (or being attempted under a claim)
    succeeded = "succeeded"  # the receiver answered 2xx
    failed = "failed"  # refused, or every attempt failed
