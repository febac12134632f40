"""`tidemind serve {api_server,api_client,gradio,proxy}`.

Each verb lives in its own module, which provides `add_arguments(parser)` and `run(args)` and
keeps its top-level imports light (web frameworks load inside `run`), so that `tidemind --help`
stays fast.
"""
from __future__ import annotations

import importlib

SERVE_COMMANDS = {
    "api_server": ("tidemind.serve.openai.launch", "serve a model over an OpenAI-compatible HTTP API"),
    "api_client": ("tidemind.serve.client", "chat in the terminal with a running api_server"),
    "gradio": ("tidemind.serve.gradio_app", "a web chat page, on its own engine or in front of an api_server"),
    "proxy": ("tidemind.serve.proxy.launch", "spread requests over several api_servers"),
}


def add_commands(commands) -> None:
    serve = commands.add_parser("serve", help="serve models over HTTP, chat with servers, route requests")
    verbs = serve.add_subparsers(dest="serve_command", metavar="VERB")
    verbs.required = True
    for verb, (module_name, help_text) in SERVE_COMMANDS.items():
        module = importlib.import_module(module_name)
        parser = verbs.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(parser)
        parser.set_defaults(handler=module.run)
