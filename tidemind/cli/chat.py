"""`tidemind chat [MODEL]`: a streaming terminal chat (also usable with a pipe on stdin)."""
from __future__ import annotations

import argparse
import sys

from ..config import EngineConfig, GenerationConfig
from .args import add_config_flags, config_from_args

END_WORD = "end"  # starts a new conversation
EXIT_WORD = "exit"  # quits

# Flags of GenerationConfig that make sense for a person chatting.
_CHAT_GEN_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p",
                    "repetition_penalty", "random_seed", "stop_words")


def add_commands(commands) -> None:
    p = commands.add_parser("chat", help="chat with a model in the terminal",
                            description="Chat with a model. Type 'end' to start a new conversation, "
                                        "'exit' to quit. With a pipe on stdin, each line gets one answer.")
    p.add_argument("model", nargs="?", default=None,
                   help="a model directory, a .gguf file or a bundled model name (default: the bundled "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--chat-template", default=None, help="a built-in template name (see `tidemind list`) "
                                                         "or a JSON file with ChatTemplateConfig fields")
    p.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add_config_flags(p, EngineConfig, "engine")
    gen_exclude = [f for f in GenerationConfig.__dataclass_fields__ if f not in _CHAT_GEN_FIELDS]
    add_config_flags(p, GenerationConfig, "generation", exclude=gen_exclude)
    p.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from ..api import pipeline

    interactive = sys.stdin.isatty()
    engine_config = config_from_args(EngineConfig, args)
    gen_config = config_from_args(GenerationConfig, args)
    if interactive:
        print(f"loading {args.model or 'the bundled SmolLM2-135M-Instruct'} ...", file=sys.stderr, flush=True)
    with pipeline(args.model, backend_config=engine_config, chat_template=args.chat_template,
                  log_level=args.log_level) as pipe:
        if interactive:
            kv = pipe.engine.runner.kv_spec
            print(f"{pipe.engine.resolved.name} on {pipe.engine.runner.device}, chat template "
                  f"{pipe.chat_template.name}, KV cache {kv.num_blocks} blocks x {kv.block_size} tokens "
                  f"({kv.num_tokens} tokens). Type '{END_WORD}' for a new conversation, '{EXIT_WORD}' to quit.",
                  file=sys.stderr)
        session = None
        while True:
            line = _read_line(interactive)
            if line is None or line.strip() == EXIT_WORD:
                return 0
            prompt = line.strip()
            if not prompt:
                continue
            if prompt == END_WORD:
                if session is not None:
                    pipe.end_session(session)
                session = None
                if interactive:
                    print("(new conversation)", file=sys.stderr)
                continue
            session = _answer(pipe, prompt, session, gen_config)


def _read_line(interactive: bool):
    try:
        return input("\n>>> ") if interactive else sys.stdin.readline() or None
    except EOFError:
        return None


def _answer(pipe, prompt: str, session, gen_config):
    """Stream one answer to stdout and return the conversation to continue."""
    session = session or pipe.new_session()
    try:
        for delta in pipe.chat(prompt, session=session, gen_config=gen_config, stream_response=True):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    except ValueError as exc:
        # e.g. the conversation outgrew session_len: say so and start afresh.
        print(f"[{exc}; starting a new conversation]", file=sys.stderr)
        pipe.end_session(session)
        return None
    sys.stdout.write("\n")
    sys.stdout.flush()
    return session
