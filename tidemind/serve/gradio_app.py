"""`tidemind serve gradio [MODEL|URL]`: a web chat page.

The page talks to a ChatBackend, which opens one Conversation (chat_loop.Conversation) per browser
session: either an in-process Pipeline (MODEL: a model directory, a .gguf file, a bundled name, or
nothing for the default) or an api_server (URL: http:// or https://), whose interactive sessions
keep the KV. The page and its controls are the same for both.

gradio is imported inside functions (light `--help`), after GRADIO_ANALYTICS_ENABLED=False: the
page must work with no internet, so it sends no telemetry, makes no share link and uses no font or
script from elsewhere.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Dict, List, Optional

from ..config import EngineConfig, GenerationConfig
from .chat_loop import ChatTurnError, Conversation, LocalConversation

logger = logging.getLogger("tidemind")

# (label, elem_id, minimum, maximum, step, default) of the sampling controls, in GenerationConfig's
# names; temperature 0 is greedy.
SAMPLING_CONTROLS = (
    ("Max new tokens", "max_new_tokens", 1, 4096, 1, 512),
    ("Temperature", "temperature", 0.0, 2.0, 0.05, 0.7),
    ("Top p", "top_p", 0.05, 1.0, 0.05, 0.8),
    ("Top k", "top_k", 0, 200, 1, 40),
    ("Repetition penalty", "repetition_penalty", 0.5, 2.0, 0.01, 1.0),
)
STOPPED_MARK = "*(stopped)*"


def is_url(model_or_url: Optional[str]) -> bool:
    return bool(model_or_url) and model_or_url.startswith(("http://", "https://"))


def gen_config_from_controls(max_new_tokens, temperature, top_p, top_k, repetition_penalty) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=temperature > 0,
                            temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                            repetition_penalty=float(repetition_penalty))


# ------------------------------------------------------------------------------------ backends
class ChatBackend:
    """Opens conversations for the page; `name` is shown in its title."""

    def __init__(self, name: str, open_conversation: Callable[[], Conversation], close: Callable[[], None]):
        self.name = name
        self.open = open_conversation
        self.close = close


def local_backend(model: Optional[str], engine_config: EngineConfig, chat_template: Optional[str],
                  log_level: str) -> ChatBackend:
    from ..api import pipeline

    pipe = pipeline(model, backend_config=engine_config, chat_template=chat_template, log_level=log_level)
    return ChatBackend(pipe.engine.resolved.name, lambda: LocalConversation(pipe), pipe.close)


def remote_backend(url: str, api_key: Optional[str]) -> ChatBackend:
    from .client import InteractiveClient, RemoteConversation

    client = InteractiveClient(url, api_key)
    names = client.model_names()  # fail at start-up if the URL or the key is wrong
    name = f"{', '.join(names) or 'no model'} at {client.url}"
    # Each conversation gets a random session id on the server (client.new_session_id).
    return ChatBackend(name, lambda: RemoteConversation(client), client.close)


# ------------------------------------------------------------------------------------ the page
class PageSession:
    """One browser session's chat: its conversation and the messages the page shows."""

    def __init__(self, conversation: Conversation):
        self.conversation = conversation
        self.messages: List[Dict[str, str]] = []  # the Chatbot's value, {"role", "content"}
        self.stopped = False  # the Stop button was pressed during the running answer
        self.answering = False  # an answer is streaming (one at a time per conversation)

    def shown(self) -> List[Dict[str, str]]:
        # A fresh list each time: gradio diffs streamed values against the previous one.
        return [dict(m) for m in self.messages]


def _close_page_session(session: Optional[PageSession]) -> None:
    if session is not None:
        try:
            session.conversation.close()
        except Exception as exc:  # the browser is gone; an unreachable server frees idle sessions itself
            logger.warning("could not end a closed page's conversation: %s", exc)


def _warn_on_failure(gr, action: Callable[[], None]) -> None:
    from .client import ServerError

    try:
        action()
    except (ChatTurnError, ServerError) as exc:  # e.g. the api_server went away
        gr.Warning(str(exc))


def build_demo(backend: ChatBackend):
    import gradio as gr

    from .client import ServerError

    def chat(prompt, session, *controls):
        """Yields (prompt box, chatbot, state, Send button); Send is disabled while answering (and the
        page ignores Enter then: gradio's trigger_mode "once")."""
        session = session or PageSession(backend.open())
        prompt = (prompt or "").strip()
        if session.answering:
            gr.Warning("an answer is still being written: wait for it, or press Stop")
            yield prompt, session.shown(), session, gr.Button()
            return
        if not prompt:
            yield "", session.shown(), session, gr.Button()
            return
        gen_config = gen_config_from_controls(*controls)
        answer = {"role": "assistant", "content": ""}
        session.messages += [{"role": "user", "content": prompt}, answer]
        session.stopped, session.answering = False, True
        yield "", session.shown(), session, gr.Button(interactive=False)
        stream = None
        try:
            stream = session.conversation.send(prompt, gen_config)
            for text in stream:
                if session.stopped:
                    break  # closing the stream aborts the turn, should the backend have missed the cancel
                answer["content"] += text
                # gr.skip(): the box keeps what the user types meanwhile
                yield gr.skip(), session.shown(), session, gr.skip()
        except (ChatTurnError, ServerError) as exc:
            answer["content"] += f"\n\n*{exc}*"
            gr.Warning(str(exc))
        finally:
            if stream is not None:
                stream.close()
            session.answering = False
        if session.stopped:
            answer["content"] = f"{answer['content']} {STOPPED_MARK}".lstrip()
        yield gr.skip(), session.shown(), session, gr.Button(interactive=True)

    def stop(session):
        if session is not None:
            session.stopped = True
            _warn_on_failure(gr, session.conversation.cancel)

    def reset(session):
        if session is not None:
            session.stopped = True
            _warn_on_failure(gr, session.conversation.reset)  # aborts a running answer, frees the KV
            session.messages = []
        return [], session

    with gr.Blocks(title=f"tidemind · {backend.name}", analytics_enabled=False) as demo:
        gr.Markdown(f"### tidemind chat · {backend.name}")
        state = gr.State(None, delete_callback=_close_page_session)
        with gr.Row():
            with gr.Column(scale=4):
                # No "share" button: it posts to Hugging Face Spaces.
                chatbot = gr.Chatbot(elem_id="chatbot", label="Conversation", height=480,
                                     buttons=["copy", "copy_all"],
                                     placeholder="Answers stream here. Stop ends an answer early; Reset "
                                                 "starts a new conversation.")
                with gr.Row():
                    prompt = gr.Textbox(elem_id="prompt", show_label=False, scale=5, autofocus=True,
                                        container=False, placeholder="Ask something and press Enter")
                    send = gr.Button("Send", elem_id="send", variant="primary", scale=1)
                with gr.Row():
                    stop_button = gr.Button("Stop", elem_id="stop", variant="stop")
                    reset_button = gr.Button("Reset", elem_id="reset")
            with gr.Column(scale=1):
                gr.Markdown("Sampling (temperature 0 is greedy)")
                controls = [gr.Slider(lo, hi, value=default, step=step, label=label, elem_id=elem_id)
                            for label, elem_id, lo, hi, step, default in SAMPLING_CONTROLS]
        gr.on([send.click, prompt.submit], chat, inputs=[prompt, state, *controls],
              outputs=[prompt, chatbot, state, send], show_progress="hidden", concurrency_limit=None)
        stop_button.click(stop, inputs=[state], outputs=None, concurrency_limit=None)
        # The Chatbot's own trash icon must forget the conversation too, not only its display.
        gr.on([reset_button.click, chatbot.clear], reset, inputs=[state], outputs=[chatbot, state],
              concurrency_limit=None)
    return demo


def serve(demo, server_name: str, server_port: int) -> None:
    """Serve the page at / with a /health route (for supervisors and tests), until Ctrl-C."""
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    # The engine batches concurrent answers, so events are not serialized per page.
    demo.queue(default_concurrency_limit=None)
    app = gr.mount_gradio_app(app, demo, path="/", server_name=server_name, server_port=server_port,
                              footer_links=["api", "settings"], run_history=False, ssr_mode=False,
                              mcp_server=False, theme=gr.themes.Default())
    shown_host = "127.0.0.1" if server_name in ("0.0.0.0", "::") else server_name
    print(f"chat page on http://{shown_host}:{server_port} (listening on {server_name})", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=server_name, port=server_port, log_level="warning")


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config_flags import add_config_flags

    parser.add_argument("model_or_url", metavar="MODEL_OR_URL", nargs="?", default=None,
                        help="a model directory, a .gguf file or a bundled model name to run in this process "
                             "(default: the bundled SmolLM2-135M-Instruct), or the URL of a `tidemind serve "
                             "api_server` (http://... or https://...) to put the page in front of")
    parser.add_argument("--server-name", default="0.0.0.0", help="address the page listens on")
    parser.add_argument("--server-port", type=int, default=6006, help="port the page listens on")
    parser.add_argument("--chat-template", default=None,
                        help="with a MODEL: a built-in template name (see `tidemind list`) or a JSON file "
                             "with ChatTemplateConfig fields")
    parser.add_argument("--api-key", default=None, help="with a URL: a key the api_server accepts")
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add_config_flags(parser, EngineConfig, "engine (with a MODEL)")


def _engine_flags_given(args: argparse.Namespace) -> List[str]:
    from ..config_flags import flag_name

    return [flag_name(f) for f in EngineConfig.__dataclass_fields__ if getattr(args, f, None) is not None]


def check_port_free(host: str, port: int) -> None:
    """Fail before loading a model if the page could not listen anyway."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror}): pick a free port with --server-port "
                         f"or another address with --server-name") from None


def run(args: argparse.Namespace) -> int:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    check_port_free(args.server_name, args.server_port)
    if is_url(args.model_or_url):
        ignored = _engine_flags_given(args) + (["--chat-template"] if args.chat_template else [])
        if ignored:
            raise ValueError(f"{', '.join(ignored)} set up an in-process engine, but {args.model_or_url} is a "
                             f"server: give those flags to its `tidemind serve api_server`, or drop them")
        backend = remote_backend(args.model_or_url, args.api_key)
    else:
        if args.api_key:
            raise ValueError("--api-key is for a server URL; with a MODEL the page runs its own engine: drop it")
        from ..config_flags import config_from_args

        print(f"loading {args.model_or_url or 'the bundled SmolLM2-135M-Instruct'} ...", file=sys.stderr, flush=True)
        backend = local_backend(args.model_or_url, config_from_args(EngineConfig, args), args.chat_template,
                                args.log_level)
    try:
        serve(build_demo(backend), args.server_name, args.server_port)
    finally:
        backend.close()
    return 0
