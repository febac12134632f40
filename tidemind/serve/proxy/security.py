"""Who may do what on the proxy.

- Clients: with --api-keys, every path but /health needs `Authorization: Bearer KEY` (ApiKeyCheck).
- Node registration (/nodes/add, /nodes/remove): with --registration-key, that key and nothing
  else (a client's API key does not let it register nodes); without one, only local requests
  (is_local_request), which with --api-keys must present a key as on any path.
"""
from __future__ import annotations

import ipaddress
import secrets
from typing import Iterable, List, Optional, Tuple

from fastapi import Request
from fastapi.responses import JSONResponse

from . import REGISTRATION_KEY_ENV
from .state import ProxySettings, error_response

REGISTRATION_PATHS = ("/nodes/add", "/nodes/remove")


def is_loopback(host: Optional[str]) -> bool:
    """Whether `host` (an address, as a peer's or a listening one) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


# Headers a reverse proxy adds to the requests it relays (the de facto one, RFC 7239's, nginx's).
_FORWARDING_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


def is_local_request(request: Request) -> bool:
    """A request made on this machine: its TCP peer is loopback and nobody relayed it. The peer is
    the connection's own (the proxy runs uvicorn without proxy_headers, so no header can change it);
    a request carrying a forwarding header came through a reverse proxy, local or not, from a
    client that may be anywhere."""
    peer = request.client.host if request.client else None
    return is_loopback(peer) and not any(name in request.headers for name in _FORWARDING_HEADERS)


def _bearer_token(headers: Iterable[Tuple[bytes, bytes]]) -> bytes:
    scheme, _, token = dict(headers).get(b"authorization", b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def _matches(token: bytes, keys: List[bytes]) -> bool:
    if not token:
        return False
    # A list, not a generator: every key is compared, so the time taken tells nothing of which matched.
    return any([secrets.compare_digest(token, key) for key in keys])


class ApiKeyCheck:
    """ASGI middleware: every path but /health (and the registration paths when a registration key
    guards them instead) needs `Authorization: Bearer KEY` with one of the client keys."""

    def __init__(self, app, keys: Tuple[str, ...], exempt: Tuple[str, ...] = ("/health",)):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.exempt = frozenset(exempt)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.exempt \
                and not _matches(_bearer_token(scope.get("headers") or ()), self.keys):
            response = error_response(401, "missing or invalid API key: send the header "
                                      "'Authorization: Bearer KEY' with one of the proxy's --api-keys",
                                      "invalid_request_error", code="invalid_api_key")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def authorize_registration(settings: ProxySettings, request: Request) -> Tuple[bool, Optional[JSONResponse]]:
    """(trusted, refusal) for a /nodes/add or /nodes/remove call: `trusted` when the caller
    presented the registration key (its nodes then get --node-api-key); `refusal`, the answer to
    send instead, when the caller may not manage nodes."""
    if settings.registration_key:
        if _matches(_bearer_token(request.scope.get("headers") or ()), [settings.registration_key.encode()]):
            return True, None
        return False, error_response(
            401, "adding and removing nodes needs the proxy's registration key: send 'Authorization: Bearer "
            "KEY' with the proxy's --registration-key (an api_server presents it with "
            f"--proxy-registration-key or ${REGISTRATION_KEY_ENV})", "invalid_request_error",
            code="invalid_registration_key")
    if is_local_request(request):
        return False, None
    peer = request.client.host if request.client else "an unknown address"
    return False, error_response(
        403, f"adding and removing nodes is accepted only from the proxy's own machine, not relayed (this "
        f"request came from {peer}): start the proxy with --registration-key KEY (or "
        f"${REGISTRATION_KEY_ENV}) and present that key, e.g. api_server --proxy-registration-key KEY",
        "invalid_request_error", code="registration_forbidden")
