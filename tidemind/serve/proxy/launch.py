"""`tidemind serve proxy`: flags and start-up. Web frameworks load inside run(), so that
`tidemind --help` stays fast."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List

from . import DEFAULT_MAX_REQUEST_BYTES, REGISTRATION_KEY_ENV
from .routing import DEFAULT_ROUTING_STRATEGY, ROUTING_STRATEGIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server-name", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: all "
                             "interfaces, then also set --api-keys and --registration-key)")
    parser.add_argument("--server-port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--routing-strategy", default=DEFAULT_ROUTING_STRATEGY, choices=tuple(ROUTING_STRATEGIES),
                        help="random: any healthy node; min_expected_latency: fewest in-flight requests "
                             "weighed by each node's observed latency; min_observed_latency: lowest moving "
                             f"average of recent latencies (default: {DEFAULT_ROUTING_STRATEGY})")
    parser.add_argument("--api-keys", nargs="+", default=None, metavar="KEY",
                        help="keys the proxy's clients must send as 'Authorization: Bearer KEY' (every "
                             "endpoint but /health); default: no check")
    # The environment is read here, not in the help text, so that --help never shows the key.
    parser.add_argument("--registration-key", default=os.environ.get(REGISTRATION_KEY_ENV) or None, metavar="KEY",
                        help="key needed to add and remove nodes (POST /nodes/add, /nodes/remove, sent as "
                             "'Authorization: Bearer KEY'; api_server: --proxy-registration-key); nodes added "
                             f"with it get --node-api-key. Default: ${REGISTRATION_KEY_ENV} (which keeps it "
                             "out of `ps`); without either, nodes can be added and removed from this machine only")
    parser.add_argument("--node-api-key", default=None, metavar="KEY",
                        help="key sent to the nodes given with --nodes or registered with --registration-key; "
                             "default: the client's own Authorization header (when the proxy has no --api-keys)")
    parser.add_argument("--allowed-node-hosts", nargs="+", default=(), metavar="HOST",
                        help="hosts nodes may be on: names, *.DOMAIN, IP addresses or networks (10.0.0.0/8), "
                             "matched against node URLs as written, never resolved; default: any host")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="BYTES",
                        help="largest request body; a larger one is answered 413 before it is read "
                             f"(default: {DEFAULT_MAX_REQUEST_BYTES}, {DEFAULT_MAX_REQUEST_BYTES >> 20} MiB)")
    parser.add_argument("--health-check-interval", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between health checks of every node; a node that fails 3 checks in "
                             "a row is dropped (default: 10)")
    parser.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="longest silence from a node during a request before the proxy gives up on "
                             "it; 0: no limit (default: 600)")
    parser.add_argument("--nodes", nargs="+", default=(), metavar="URL",
                        help="api_servers to route to from the start (http://HOST:PORT); one that is not "
                             "up yet is added when it first answers a health check")
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def _startup_lines(args: argparse.Namespace, url: str) -> List[str]:
    """What the proxy tells its operator at start: where it listens and who may use it."""
    from .security import is_loopback

    lines = [f"tidemind proxy on {url} (routing: {args.routing_strategy})"]
    if is_loopback(args.server_name):
        lines.append("listening on loopback only: other machines can reach neither the proxy nor its node "
                     "registration; to open it give --server-name 0.0.0.0 (all interfaces) or one of this "
                     "machine's addresses, with --api-keys for clients and --registration-key for nodes")
    else:
        lines.append(f"listening on {args.server_name}: other machines can reach the proxy"
                     + ("" if args.api_keys else "; without --api-keys anyone who reaches it can send requests"))
    registration = ("needs the --registration-key" if args.registration_key
                    else "is accepted from this machine only (no --registration-key)")
    lines.append(f"adding and removing nodes (POST /nodes/add, /nodes/remove; api_server --proxy-url) {registration}")
    return lines


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import ProxySettings, create_app

    settings = ProxySettings(
        routing_strategy=args.routing_strategy, api_keys=tuple(args.api_keys or ()),
        node_api_key=args.node_api_key, registration_key=args.registration_key,
        allowed_node_hosts=tuple(args.allowed_node_hosts), max_request_bytes=args.max_request_bytes,
        health_check_interval=args.health_check_interval, request_timeout=args.request_timeout or None,
        nodes=tuple(args.nodes))
    app = create_app(settings)
    host = f"[{args.server_name}]" if ":" in args.server_name else args.server_name
    for line in _startup_lines(args, f"http://{host}:{args.server_port}"):
        print(line, file=sys.stderr, flush=True)
    # A short graceful shutdown: streams still open after it are cut rather than holding the exit.
    # proxy_headers off: the client address stays the connection's own, whatever X-Forwarded-For or
    # $FORWARDED_ALLOW_IPS say, for security.is_local_request.
    uvicorn.run(app, host=args.server_name, port=args.server_port, log_level=args.log_level.lower(),
                timeout_graceful_shutdown=5, proxy_headers=False)
    return 0
