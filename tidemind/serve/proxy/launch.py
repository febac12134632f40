"""`tidemind serve proxy`: flags and start-up. Web frameworks load inside run(), so that
`tidemind --help` stays fast."""
from __future__ import annotations

import argparse
import sys

from .routing import DEFAULT_ROUTING_STRATEGY, ROUTING_STRATEGIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server-name", default="0.0.0.0", help="host to listen on (default: 0.0.0.0)")
    parser.add_argument("--server-port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--routing-strategy", default=DEFAULT_ROUTING_STRATEGY, choices=tuple(ROUTING_STRATEGIES),
                        help="random: any healthy node; min_expected_latency: fewest in-flight requests "
                             "weighed by each node's observed latency; min_observed_latency: lowest moving "
                             f"average of recent latencies (default: {DEFAULT_ROUTING_STRATEGY})")
    parser.add_argument("--api-keys", nargs="+", default=None, metavar="KEY",
                        help="keys the proxy's clients must send as 'Authorization: Bearer KEY' (all "
                             "endpoints but /health, /nodes/* included); default: no check")
    parser.add_argument("--node-api-key", default=None, metavar="KEY",
                        help="key sent to the nodes; default: the client's own Authorization header")
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


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import ProxySettings, create_app
    from .nodes import normalize_url

    settings = ProxySettings(
        routing_strategy=args.routing_strategy, api_keys=tuple(args.api_keys or ()),
        node_api_key=args.node_api_key, health_check_interval=args.health_check_interval,
        request_timeout=args.request_timeout or None, nodes=tuple(normalize_url(u) for u in args.nodes))
    app = create_app(settings)
    print(f"tidemind proxy on http://{args.server_name}:{args.server_port} (routing: "
          f"{settings.routing_strategy}); add nodes with POST /nodes/add or api_server --proxy-url",
          file=sys.stderr, flush=True)
    # A short graceful shutdown: streams still open after it are cut rather than holding the exit.
    uvicorn.run(app, host=args.server_name, port=args.server_port, log_level=args.log_level.lower(),
                timeout_graceful_shutdown=5)
    return 0
