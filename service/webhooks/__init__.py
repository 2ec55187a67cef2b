"""Webhooks: per-project receivers of job and alias events, signed and delivered from an outbox.

outbox.enqueue_event (in the caller's transaction) -> dispatcher.Dispatcher (a thread in each
API process) -> delivery.send (checked addresses, no rebinding) ; signing.verify_signature for
receivers.
"""
