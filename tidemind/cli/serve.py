"""`tidemind serve {api_server,api_client,gradio,proxy}`: each verb's module provides
`add_arguments(parser)` and `run(args)` and is imported only when the verb runs."""
from __future__ import annotations

from .lazy import add_lazy_group

SERVE_COMMANDS = {
    "api_server": ("tidemind.serve.openai.launch", "serve a model over an OpenAI-compatible HTTP API"),
    "api_client": ("tidemind.serve.client", "chat in the terminal with a running api_server"),
    "gradio": ("tidemind.serve.gradio_app", "a web chat page, on its own engine or in front of an api_server"),
    "proxy": ("tidemind.serve.proxy.launch", "spread requests over several api_servers"),
}


def add_commands(commands) -> None:
    add_lazy_group(commands, "serve", "serve models over HTTP, chat with servers, route requests", SERVE_COMMANDS)
