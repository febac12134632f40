"""Who may do what on the proxy, and how much they may send.

- Clients: with --api-keys, every path but /health needs `Authorization: Bearer KEY` (ApiKeyCheck).
- Node registration (/nodes/add, /nodes/remove): with --registration-key, that key and nothing
  else (a client's API key does not let it register nodes); without one, only local requests
  (is_local_request), which with --api-keys must present a key as on any path.
- Bodies: a request body over --max-request-bytes is answered 413 before the app reads it
  (BodySizeLimit), so neither the proxy's memory nor its JSON parser sees more than that.
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
    """(key_presented, refusal) for a /nodes/add or /nodes/remove call: `key_presented` when the
    caller gave the registration key (the nodes it adds are then trusted with --node-api-key);
    `refusal`, the answer to send instead, when the caller may not manage nodes."""
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


class BodySizeLimit:
    """ASGI middleware: reads the request body (the proxy needs it whole anyway), answering 413 as
    soon as it is known to exceed `limit` bytes: at once from Content-Length, else when the chunks
    received so far pass it. The app then reads the body from memory: at most `limit` bytes, plus
    the one chunk that passes it, are ever held."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before it finished sending: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: http.disconnect, when the client leaves
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(
            413, f"the request body is larger than the proxy's limit of {self.limit} bytes: send a smaller "
            "request, or start the proxy with a larger --max-request-bytes", "invalid_request_error",
            code="request_too_large")
        # The rest of the body is never read, so the connection cannot carry another request.
        response.headers["connection"] = "close"
        await response(scope, receive, send)
