"""Where webhooks may connect: public addresses only, unless the operator allows private ones.

Every DNS answer of a receiver's name is checked, on every hop of a redirect, and the request
then goes to an address that was checked (delivery.py), so a name that re-resolves to an inside
address between the check and the connect (DNS rebinding) reaches nothing.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import httpx

SCHEMES = ("http", "https")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedDestination(Exception):
    """The URL points where webhooks may not go; nothing was sent."""


@dataclass(frozen=True)
class AddressPolicy:
    """Public addresses always; every other one with allow_private, or those in `allowed` networks."""

    allow_private: bool = False
    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def of(cls, settings) -> AddressPolicy:
        return cls(settings.webhook_allow_private,
                   tuple(ipaddress.ip_network(str(net)) for net in settings.webhook_allowed_networks))

    def refusal(self, ip: Address) -> str | None:
        if self.allow_private or any(ip.version == net.version and ip in net for net in self.allowed):
            return None
        return refusal(ip)


def refusal(ip: Address) -> str | None:
    """Why Graft will not connect to `ip`, or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return f"{ip} is a {kind.replace('_', '-')} address"
    if not ip.is_global:  # shared (100.64/10), documentation and other special-purpose ranges
        return f"{ip} is not a public address"
    return None


def check_scheme(url: httpx.URL) -> None:
    if url.scheme not in SCHEMES or not url.host:
        raise RefusedDestination(f"webhook URLs must be http:// or https:// with a host; got {str(url)[:200]!r}")


def literal_ip(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def resolve(host: str, port: int) -> list[Address]:
    """Every address the name resolves to (A and AAAA), in the resolver's order."""
    ip = literal_ip(host)
    if ip is not None:
        return [ip]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise OSError(f"cannot resolve {host}: {exc}") from exc
    addresses = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])  # drop an IPv6 zone id
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def checked_addresses(url: httpx.URL, policy: AddressPolicy) -> list[Address]:
    """The addresses to connect to for `url`; RefusedDestination if any DNS answer is refused
    (one inside answer among public ones is how rebinding attacks start), OSError if it does not resolve."""
    check_scheme(url)
    addresses = resolve(url.host, url.port or (443 if url.scheme == "https" else 80))
    for ip in addresses:
        reason = policy.refusal(ip)
        if reason:
            raise RefusedDestination(f"{url.host} resolves to {ip}: {reason}; webhooks go to public addresses "
                                     "only (the operator can allow others: GRAFT_WEBHOOK_ALLOW_PRIVATE, "
                                     "GRAFT_WEBHOOK_ALLOWED_NETWORKS)")
    return addresses
