"""Outbound calls, each behind a small interface, all through controlplane/lib/http.py.

- ``ModelServer``: a model server's /metrics, its prediction log, and a probe request.
- ``CHANNELS``: alert notification transports keyed by name (``webhook``, ``email``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import smtplib
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from django.conf import settings
from django.core.mail import send_mail

from controlplane.lib import http

PROBE_REQUEST_PREFIX = "cp-probe-"
SIGNATURE_HEADER = "X-Controlplane-Signature"


class AdapterError(Exception):
    """An outbound call failed; the message says how."""


# --- model servers -----------------------------------------------------------------------------


@dataclass
class ProbeOutcome:
    ok: bool
    latency_ms: float | None
    status_code: int | None
    model_version: str | None
    error: str


class ModelServer:
    """One model server (or a deployment's stable endpoint) at ``address``: ``host:port``, a
    URL, or ``unix:/path/to.sock`` (a server in its own network namespace or container)."""

    def __init__(
        self, address: str, *, timeout: float = 5.0, admin_tokens: Sequence[str] = ()
    ) -> None:
        """``admin_tokens``: the server's SERVING_ADMIN_TOKEN, sent to its admin endpoints,
        or those it may hold, in order (deployments.serving_token.serving_admin_tokens); the
        next one is tried when a server refuses one with 401."""
        self.base = http.address_url(address)
        self.timeout = timeout
        self._admin_tokens = list(admin_tokens)

    def metrics(self) -> str:
        try:
            return http.request("GET", f"{self.base}/metrics", timeout=self.timeout).body.decode()
        except http.HttpError as exc:
            raise AdapterError(str(exc)) from exc

    def predictions(self, *, after: int, limit: int) -> dict:
        while True:
            token = self._admin_tokens[0] if self._admin_tokens else None
            try:
                resp = http.request(
                    "GET",
                    f"{self.base}/predictions?after={after}&limit={limit}",
                    timeout=self.timeout,
                    headers={"Authorization": f"Bearer {token}"} if token else {},
                )
            except http.HttpStatusError as exc:
                if exc.status == 401 and len(self._admin_tokens) > 1:
                    self._admin_tokens.pop(0)  # an older token, for a server started before
                    continue
                raise AdapterError(str(exc)) from exc
            except http.HttpError as exc:
                raise AdapterError(str(exc)) from exc
            break
        try:
            page = resp.json()
        except ValueError as exc:
            raise AdapterError(f"GET /predictions: not JSON: {exc}") from exc
        if not isinstance(page, dict) or not isinstance(page.get("records"), list):
            raise AdapterError("GET /predictions: unexpected answer")
        return page

    def probe(self, payload: Any | None) -> ProbeOutcome:
        """POST the payload to /invocations (GET /ping without one); time the answer."""
        headers = {"X-Request-Id": f"{PROBE_REQUEST_PREFIX}{uuid.uuid4().hex}"}
        started = time.perf_counter()
        try:
            if payload is None:
                resp = http.request(
                    "GET",
                    f"{self.base}/ping",
                    timeout=self.timeout,
                    headers=headers,
                    raise_for_status=False,
                )
            else:
                resp = http.request(
                    "POST",
                    f"{self.base}/invocations",
                    timeout=self.timeout,
                    data=json.dumps(payload).encode(),
                    headers={**headers, "Content-Type": "application/json"},
                    raise_for_status=False,
                )
        except http.HttpError as exc:
            return ProbeOutcome(False, None, None, None, str(exc)[:2000])
        latency_ms = (time.perf_counter() - started) * 1000
        ok = resp.status == 200
        error = "" if ok else f"HTTP {resp.status}: {resp.body[:500].decode(errors='replace')}"
        version = {k.lower(): v for k, v in resp.headers.items()}.get("x-model-version")
        return ProbeOutcome(ok, latency_ms, resp.status, version, error)


# --- notification channels ---------------------------------------------------------------------


@dataclass
class Delivery:
    ok: bool
    status: int | None
    error: str
    attempts: int = 1


class Channel(Protocol):
    name: str

    def validate(self, target: str) -> None: ...

    def send(self, target: str, *, subject: str, payload: dict, secret: str) -> Delivery: ...


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches through a transition mechanism:
    IPv4-mapped, IPv4-compatible, NAT64, 6to4 or Teredo (its client address)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _V4_COMPATIBLE and int(ip) > 1:  # ::a.b.c.d (not :: or ::1)
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ip.sixtofour
    if ip in _TEREDO:
        return ip.teredo[1]
    return None


def _blocked(address: str) -> bool:
    """Private, loopback, link-local, multicast, or an IPv6 form of one of those,
    unless CONTROLPLANE_WEBHOOK_ALLOWED_NETWORKS lists it."""
    ip = ipaddress.ip_address(address)
    inner = embedded_ipv4(ip) if ip.version == 6 else None
    allowed = [
        ipaddress.ip_network(n, strict=False)
        for n in settings.CONTROLPLANE_WEBHOOK_ALLOWED_NETWORKS
    ]
    for candidate in (ip, inner):
        if candidate is not None and any(
            candidate.version == net.version and candidate in net for net in allowed
        ):
            return False
    return any(
        candidate is not None and (not candidate.is_global or candidate.is_multicast)
        for candidate in (ip, inner)
    )


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookChannel:
    """POST of a JSON body signed with HMAC-SHA256 (``X-Controlplane-Signature:
    sha256=<hex>``); a mandatory timeout, retries with backoff, no redirects, and no
    private, loopback or link-local targets unless CONTROLPLANE_WEBHOOK_ALLOWED_NETWORKS
    lists them."""

    name = "webhook"

    def validate(self, target: str) -> None:
        try:
            parts = urlsplit(target)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise AdapterError(f"not a URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AdapterError("the webhook URL must be http:// or https:// with a host")
        if parts.username or parts.password:
            raise AdapterError("the webhook URL must not carry credentials")
        try:
            infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except (OSError, ValueError, UnicodeError) as exc:
            raise AdapterError(f"cannot resolve {parts.hostname}: {exc}") from None
        for info in infos:
            address = info[4][0].split("%")[0]
            if _blocked(address):
                raise AdapterError(
                    f"{parts.hostname} resolves to {address}, a private, loopback or link-local address; "
                    "allow it with CONTROLPLANE_WEBHOOK_ALLOWED_NETWORKS"
                )

    def send(self, target: str, *, subject: str, payload: dict, secret: str) -> Delivery:
        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "controlplane-alerts/1",
            SIGNATURE_HEADER: sign(secret, body),
            "X-Controlplane-Event": str(payload.get("event_id", "")),
        }
        error, status = "", None
        attempts = settings.CONTROLPLANE_WEBHOOK_RETRIES
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                time.sleep(min(0.5 * 2 ** (attempt - 2), 5.0))
            try:
                self.validate(target)  # again: DNS may have changed since the rule was saved
                resp = http.request(
                    "POST",
                    target,
                    data=body,
                    headers=headers,
                    timeout=settings.CONTROLPLANE_WEBHOOK_TIMEOUT,
                    raise_for_status=False,
                )
            except AdapterError as exc:
                return Delivery(
                    False, None, str(exc), attempt
                )  # a refused target: retrying will not help
            except http.HttpError as exc:
                error, status = str(exc), None
                continue
            status = resp.status
            if 200 <= resp.status < 300:
                return Delivery(True, status, "", attempt)
            error = f"HTTP {resp.status}"
            if 300 <= resp.status < 400:
                return Delivery(False, status, f"{error}: redirects are not followed", attempt)
            if 400 <= resp.status < 500 and resp.status not in (408, 429):
                return Delivery(False, status, error, attempt)
        return Delivery(False, status, error, attempts)


class EmailChannel:
    """Plain-text mail through Django's mail backend."""

    name = "email"

    def validate(self, target: str) -> None:
        from django.core.exceptions import ValidationError
        from django.core.validators import validate_email

        try:
            validate_email(target)
        except ValidationError as exc:
            raise AdapterError(f"{target!r} is not an e-mail address") from exc

    def send(self, target: str, *, subject: str, payload: dict, secret: str) -> Delivery:
        lines = [subject, ""] + [f"{key}: {value}" for key, value in payload.items()]
        try:
            send_mail(
                subject,
                "\n".join(lines),
                settings.DEFAULT_FROM_EMAIL,
                [target],
                fail_silently=False,
            )
        except Exception as exc:  # SMTP errors of every kind
            return Delivery(False, None, email_failure_message(exc))
        return Delivery(True, None, "")


def email_failure_message(exc: Exception) -> str:
    """What failed, and where its settings are: a bare "Connection refused" says neither."""
    server = f"{settings.EMAIL_HOST}:{settings.EMAIL_PORT}"
    if isinstance(exc, OSError) and not isinstance(exc, smtplib.SMTPException):
        what = f"cannot reach the mail server {server}"
    else:
        what = f"the mail server {server} refused the message"
    return (
        f"e-mail not sent: {what} ({type(exc).__name__}: {exc}); "
        "check EMAIL_HOST, EMAIL_PORT, EMAIL_USE_TLS, EMAIL_HOST_USER and EMAIL_HOST_PASSWORD"
    )


CHANNELS: dict[str, Channel] = {"webhook": WebhookChannel(), "email": EmailChannel()}


def get_channel(name: str) -> Channel:
    return CHANNELS[name]
