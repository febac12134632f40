"""`tidemind serve api_server [MODEL]`: flags, start-up and shutdown of the HTTP server.

Only light imports at module level: the CLI imports this module to build its parser.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
from typing import Optional
from urllib.parse import urlsplit

from ...config_flags import add_config_flags, config_from_args
from ...config import EngineConfig
from ..proxy import REGISTRATION_KEY_ENV

logger = logging.getLogger("tidemind")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20  # a 128k-token prompt sent as token ids is about 1 MiB of JSON
_PROXY_TIMEOUT_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="a model directory, a .gguf file or a bundled model name (default: the bundled "
                             "SmolLM2-135M-Instruct)")
    server = parser.add_argument_group("server")
    server.add_argument("--server-name", default="0.0.0.0", help="address to listen on (default: 0.0.0.0, "
                                                                 "all interfaces; 127.0.0.1: this machine only)")
    server.add_argument("--server-port", type=int, default=23333, help="port to listen on (default: 23333)")
    server.add_argument("--model-name", default=None,
                        help="the model's name in the API (/v1/models, the requests' 'model'); default: the "
                             "model's own name, e.g. smollm2-135m")
    server.add_argument("--api-keys", nargs="+", default=None, metavar="KEY",
                        help="accept /v1/* requests only with 'Authorization: Bearer KEY' for one of these keys "
                             "(/health and /metrics stay open)")
    server.add_argument("--max-concurrent-requests", type=int, default=None, metavar="N",
                        help="answer at most N generation requests at once; more get 429 at once (default: no limit)")
    server.add_argument("--strict-fields", action="store_true",
                        help="refuse (400) request fields tidemind does not know; by default they are ignored, "
                             "logged once per field name (fields with a null or empty value are always ignored)")
    server.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="BYTES",
                        help=f"largest request body; a larger one gets 413 before it is parsed (default: "
                             f"{DEFAULT_MAX_REQUEST_BYTES} = {DEFAULT_MAX_REQUEST_BYTES >> 20} MiB; 0: no limit)")
    server.add_argument("--allow-origins", nargs="+", default=None, metavar="ORIGIN",
                        help="enable CORS for these origins ('*' for any)")
    server.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    server.add_argument("--allow-methods", nargs="+", default=["*"], help="CORS: allowed methods (default: *)")
    server.add_argument("--allow-headers", nargs="+", default=["*"], help="CORS: allowed headers (default: *)")
    server.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="log level of tidemind and uvicorn (default: INFO)")
    server.add_argument("--proxy-url", default=None,
                        help="a `tidemind serve proxy` URL: register there at start (POST /nodes/add) and "
                             "leave at shutdown (POST /nodes/remove)")
    # --proxy-api-key: the flag's former name. The environment is read here, so --help never shows the key.
    server.add_argument("--proxy-registration-key", "--proxy-api-key", dest="proxy_api_key",
                        default=os.environ.get(REGISTRATION_KEY_ENV) or None, metavar="KEY",
                        help="the key to present when registering with the proxy: its --registration-key "
                             f"(default: ${REGISTRATION_KEY_ENV}); for a proxy without one, one of its --api-keys")
    server.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                        help="run the engine in a process of its own, so that streaming answers over HTTP and "
                             "the engine's host work never wait for one Python lock (default: on with a GPU, off "
                             "on the CPU, where both share the same cores anyway)")
    server.add_argument("--chat-template", default=None,
                        help="a built-in template name (see `tidemind list`) or a JSON file with "
                             "ChatTemplateConfig fields; default: the model's own template")
    add_config_flags(parser, EngineConfig, "engine")


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.server_port <= 65535:
        raise SystemExit(f"--server-port {args.server_port} is not a port: give a number in 0..65535")
    if args.max_concurrent_requests is not None and args.max_concurrent_requests < 1:
        raise SystemExit(f"--max-concurrent-requests {args.max_concurrent_requests} must be >= 1 "
                         "(leave it out for no limit)")
    if args.max_request_bytes < 0:
        raise SystemExit(f"--max-request-bytes {args.max_request_bytes} must be >= 0 (0: no limit)")
    if args.api_keys is not None and not all(key.strip() for key in args.api_keys):
        raise SystemExit("--api-keys got an empty key: give non-empty keys")
    if args.proxy_url is not None and urlsplit(args.proxy_url).scheme not in ("http", "https"):
        raise SystemExit(f"--proxy-url {args.proxy_url!r} must start with http:// or https://")


def _engine_process(args: argparse.Namespace, engine_config: EngineConfig) -> bool:
    if args.engine_process is not None:
        return args.engine_process
    from ...runner.device import resolve_device

    return resolve_device(engine_config.device).type == "cuda"


def _cors(args: argparse.Namespace) -> Optional[dict]:
    if not args.allow_origins:
        return None
    return dict(allow_origins=args.allow_origins, allow_credentials=args.allow_credentials,
                allow_methods=args.allow_methods, allow_headers=args.allow_headers)


def public_url(host: str, port: int, proxy_url: Optional[str] = None) -> str:
    """The URL others reach this server at. Listening on all interfaces, that is the address of
    the interface that routes to the proxy (or this host's name resolved, without a proxy)."""
    if host in ("0.0.0.0", "::", ""):
        host = _route_address(proxy_url)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _route_address(proxy_url: Optional[str]) -> str:
    target = urlsplit(proxy_url).hostname if proxy_url else None
    try:
        if target:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))  # UDP connect sends nothing; it only picks the route
                return s.getsockname()[0]
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


async def _tell_proxy(proxy_url: str, action: str, url: str, api_key: Optional[str]) -> None:
    import httpx

    endpoint = f"{proxy_url.rstrip('/')}/nodes/{action}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=_PROXY_TIMEOUT_S) as client:
            response = await client.post(endpoint, json={"url": url}, headers=headers)
        if action == "remove" and response.status_code == 404:
            logger.info("the proxy %s had already dropped %s", proxy_url, url)
            return
        if response.status_code in (401, 403):
            try:  # the proxy's own message names the fix
                reason = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                reason = "give its --registration-key with --proxy-registration-key"
            logger.warning("the proxy %s refused to %s %s: %s", proxy_url,
                           "register" if action == "add" else "deregister", url, reason)
            return
        response.raise_for_status()
        logger.info("%s %s at the proxy %s", "registered" if action == "add" else "deregistered", url, proxy_url)
    except httpx.HTTPError as exc:
        fix = ("start the proxy, or add this server later with POST /nodes/add" if action == "add"
               else "remove it there with POST /nodes/remove")
        logger.warning("could not %s %s at the proxy %s (%s): %s",
                       "register" if action == "add" else "deregister", url, endpoint, exc or type(exc).__name__, fix)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, telling the proxy when it has started (its socket listens) and, before it
        stops accepting requests, that it is leaving."""

        def __init__(self, config, model_name: str, pipe, proxy_url: Optional[str], proxy_api_key: Optional[str]):
            super().__init__(config)
            self.model_name, self.pipe, self.proxy_url = model_name, pipe, proxy_url
            self.proxy_api_key = proxy_api_key
            self.url: Optional[str] = None
            self.engine_failure: Optional[str] = None
            # An engine that cannot go on stops the server (exit code 1), so that a supervisor or the
            # proxy notices; until uvicorn has shut down, /health answers 503.
            pipe.async_engine.on_failure.append(self._engine_failed)

        def _engine_failed(self, reason: str) -> None:  # called in the engine's thread
            logger.critical("the engine stopped (%s): shutting the server down", reason)
            self.engine_failure = reason
            self.should_exit = True

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.started:
                return
            port = self.servers[0].sockets[0].getsockname()[1] if self.servers else self.config.port
            self.url = public_url(self.config.host, port, self.proxy_url)
            kv = self.pipe.engine.kv_spec
            logger.info("serving %s at http://%s:%d%s (KV cache: %d blocks x %d tokens)", self.model_name,
                        self.config.host, port, f", reachable at {self.url}" if self.config.host == "0.0.0.0" else "",
                        kv.num_blocks, kv.block_size)
            if self.proxy_url:
                await _tell_proxy(self.proxy_url, "add", self.url, self.proxy_api_key)

        async def shutdown(self, sockets=None) -> None:
            if self.proxy_url and self.url:
                await _tell_proxy(self.proxy_url, "remove", self.url, self.proxy_api_key)
            await super().shutdown(sockets)

    return Server


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    import uvicorn

    from ...api import pipeline
    from .server import create_app

    engine_config = config_from_args(EngineConfig, args)
    pipe = pipeline(args.model, backend_config=engine_config, chat_template=args.chat_template,
                    log_level=args.log_level, engine_process=_engine_process(args, engine_config))
    try:
        model_name = args.model_name or pipe.engine.resolved.name
        app = create_app(pipe, model_name, api_keys=args.api_keys,
                         max_concurrent_requests=args.max_concurrent_requests, cors=_cors(args),
                         max_request_bytes=args.max_request_bytes or None, strict_fields=args.strict_fields)
        config = uvicorn.Config(app, host=args.server_name, port=args.server_port, log_level=args.log_level.lower(),
                                timeout_graceful_shutdown=5, lifespan="off")
        server = _server_class()(config, model_name, pipe, args.proxy_url, args.proxy_api_key)
        # uvicorn re-raises the signal that stopped it once it has shut down; with SIGTERM's default
        # action that would kill the process before the engine is closed.
        signal.signal(signal.SIGTERM, lambda *_: None)
        server.run()
        return 0 if server.started and server.engine_failure is None else 1
    finally:
        pipe.close()
