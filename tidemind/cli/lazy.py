"""Sub-commands whose flags are defined by modules imported only when the sub-command runs.

`tidemind --help` and `tidemind chat` then never import web frameworks; `tidemind serve gradio
--help` still shows the full flag list, built by the module itself.
"""
from __future__ import annotations

import argparse
import importlib
import logging
from typing import Dict, List, Tuple


def add_lazy_group(commands, name: str, help_text: str, verbs: Dict[str, Tuple[str, str]],
                   extra: str = "serve") -> None:
    """`tidemind NAME VERB ...`: each verb maps to (module, help); the module provides
    `add_arguments(parser)` and `run(args)`. `extra`: the pip extra whose packages the verbs import."""
    group = commands.add_parser(name, help=help_text, description=help_text)
    sub = group.add_subparsers(dest=f"{name}_command", metavar="VERB")
    sub.required = True
    for verb, (module_name, verb_help) in verbs.items():
        # The verb's own flags are parsed by _runner: main() hands it whatever it did not know.
        parser = sub.add_parser(verb, help=verb_help, add_help=False)
        parser.set_defaults(handler=_runner(f"tidemind {name} {verb}", module_name, verb_help, extra),
                            takes_extra_args=True)


def _runner(prog: str, module_name: str, description: str, extra: str):
    def run(args: argparse.Namespace, extra_args: List[str]):
        try:
            module = importlib.import_module(module_name)
            parser = argparse.ArgumentParser(prog=prog, description=description)
            module.add_arguments(parser)
            verb_args = parser.parse_args(_strip_separator(extra_args))
            level = getattr(verb_args, "log_level", None)
            if level:
                logging.getLogger().setLevel(level.upper())
            return module.run(verb_args)
        except ModuleNotFoundError as exc:  # a first install has only what `tidemind chat` needs
            if exc.name is None or exc.name.split(".")[0] == "tidemind":
                raise
            raise RuntimeError(f"`{prog}` needs the package {exc.name!r}, which is not installed: "
                               f"pip install 'tidemind[{extra}]'") from None
    return run


def _strip_separator(argv: List[str]) -> List[str]:
    return argv[1:] if argv[:1] == ["--"] else argv
