"""`tidemind chat [MODEL]`: a streaming terminal chat (also usable with a pipe on stdin)."""
from __future__ import annotations

import argparse
import sys

from ..config import EngineConfig, GenerationConfig
from ..serve.chat_loop import CHAT_GEN_FIELDS, END_WORD, EXIT_WORD
from ..config_flags import add_config_flags, config_from_args


def add_commands(commands) -> None:
    p = commands.add_parser("chat", help="chat with a model in the terminal",
                            description="Chat with a model. Type 'end' to start a new conversation, "
                                        "'exit' to quit, Ctrl-C to stop an answer. With a pipe on stdin, "
                                        "each line gets one answer line.")
    p.add_argument("model", nargs="?", default=None,
                   help="a model directory, a .gguf file or a bundled model name (default: the bundled "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--chat-template", default=None, help="a built-in template name (see `tidemind list`) "
                                                         "or a JSON file with ChatTemplateConfig fields")
    p.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add_config_flags(p, EngineConfig, "engine")
    gen_exclude = [f for f in GenerationConfig.__dataclass_fields__ if f not in CHAT_GEN_FIELDS]
    add_config_flags(p, GenerationConfig, "generation", exclude=gen_exclude)
    p.set_defaults(handler=run_chat, verb_parser=p)


def run_chat(args: argparse.Namespace) -> int:
    from ..api import pipeline
    from ..serve.chat_loop import LocalConversation, run_chat_loop

    interactive = sys.stdin.isatty()
    engine_config = config_from_args(EngineConfig, args)
    gen_config = config_from_args(GenerationConfig, args)
    if interactive:
        print(f"loading {args.model or 'the bundled SmolLM2-135M-Instruct'} ...", file=sys.stderr, flush=True)
    with pipeline(args.model, backend_config=engine_config, chat_template=args.chat_template,
                  log_level=args.log_level) as pipe:
        if interactive:
            kv = pipe.engine.kv_spec
            print(f"{pipe.engine.resolved.name} on {pipe.engine.executor.description}, chat template "
                  f"{pipe.chat_template.name}, KV cache {kv.num_blocks} blocks x {kv.block_size} tokens "
                  f"({kv.num_tokens} tokens). Type '{END_WORD}' for a new conversation, '{EXIT_WORD}' to quit, "
                  f"Ctrl-C to stop an answer.",
                  file=sys.stderr)
        return run_chat_loop(LocalConversation(pipe), gen_config, interactive)
