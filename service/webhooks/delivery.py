"""Sending one webhook request: checked addresses, redirects followed by hand, no rebinding."""
from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from service.webhooks.addresses import Address, AddressPolicy, RefusedDestination, check_scheme, checked_addresses
from service.webhooks.signing import SIGNATURE_HEADER, sign

MAX_REDIRECTS = 3
USER_AGENT = "Graft-Webhooks/1"


@dataclass(frozen=True)
class Outcome:
    status_code: int | None  # the last answer's status (None: no answer)
    error: str | None  # why it did not succeed; None when the receiver answered 2xx
    refused: bool  # the destination is not allowed: no retry
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.error is None


def new_client() -> httpx.Client:
    # trust_env=False: a proxy from the environment would connect to names we never checked.
    # No kept-alive connections: the pool knows them by IP, so one opened with another name's TLS
    # (SNI, certificate) could be reused for a receiver on the same address.
    return httpx.Client(follow_redirects=False, trust_env=False, headers={"User-Agent": USER_AGENT},
                        limits=httpx.Limits(max_keepalive_connections=0))


def send(client: httpx.Client, url: str, *, secret: str, body: str, headers: dict[str, str],
         policy: AddressPolicy, timeout_s: float) -> Outcome:
    """POST `body`, signed now, to `url`, following up to MAX_REDIRECTS redirects (each hop checked)."""
    started = time.monotonic()
    payload = body.encode()
    headers = {**headers, "Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, payload)}

    def outcome(status: int | None, error: str | None, refused: bool = False) -> Outcome:
        return Outcome(status, error, refused, round((time.monotonic() - started) * 1000))

    target = httpx.URL(url)
    for _hop in range(MAX_REDIRECTS + 1):
        try:
            addresses = checked_addresses(target, policy)
        except RefusedDestination as exc:
            return outcome(None, f"refused: {exc}", refused=True)
        except OSError as exc:
            return outcome(None, str(exc))
        try:
            response = post_pinned(client, target, addresses, payload, headers, timeout_s)
        except httpx.TimeoutException:
            return outcome(None, f"timed out after {timeout_s:g} s")
        except httpx.HTTPError as exc:
            return outcome(None, f"{type(exc).__name__}: {exc}"[:500])
        location = response.headers.get("location")
        if response.is_redirect and location:
            target = target.join(location)  # re-checked, scheme included, at the top of the loop
            try:
                check_scheme(target)
            except RefusedDestination as exc:
                return outcome(response.status_code, f"refused: redirect: {exc}", refused=True)
            continue
        if response.is_success:
            return outcome(response.status_code, None)
        return outcome(response.status_code, f"the receiver answered {response.status_code}")
    return outcome(response.status_code, f"more than {MAX_REDIRECTS} redirects")


def post_pinned(client: httpx.Client, url: httpx.URL, addresses: list[Address], payload: bytes,
                headers: dict[str, str], timeout_s: float) -> httpx.Response:
    """POST to `url` at one of `addresses` (already checked) rather than resolving its name again.

    The Host header and TLS SNI (and so the certificate check) keep the URL's name. The body of
    the answer is not read: only its status matters, and a receiver could send gigabytes.
    """
    host_header = url.netloc.decode("ascii")
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    last_error: httpx.HTTPError | None = None
    for ip in addresses:  # the next checked address when one does not accept the connection
        request = client.build_request("POST", url.copy_with(host=str(ip)), content=payload,
                                       headers={**headers, "Host": host_header}, timeout=timeout_s,
                                       extensions=extensions)
        try:
            response = client.send(request, stream=True)
        except httpx.ConnectError as exc:
            last_error = exc
            continue
        response.close()
        return response
    raise last_error or httpx.ConnectError(f"no address for {url.host}")
