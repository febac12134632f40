"""Command-line flags generated from the config dataclasses' declarations (next to config.py: the
CLI verbs, the server and the web page all build their flags with it)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from typing import Iterable, Optional

logger = logging.getLogger("tidemind")
BACKENDS = ("pytorch", "turbomind")  # LMDeploy's engines; tidemind has one engine for both

_SCALARS = (int, float, str, bool)


def _field_type(field: dataclasses.Field, owner) -> tuple:
    """(scalar type, is_sequence) of a dataclass field, reading Optional[...] and Tuple[x, ...]."""
    hint = typing.get_type_hints(owner)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) in (tuple, list):
        return typing.get_args(hint)[0], True
    if hint not in _SCALARS:
        raise TypeError(f"{owner.__name__}.{field.name}: no CLI mapping for {hint}")
    return hint, False


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, config_cls, title: str,
                     exclude: Iterable[str] = ()) -> None:
    """One flag per field of `config_cls` (help text from the field's metadata).

    Flags default to None so that only what the user typed overrides the config's own defaults.
    """
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(config_cls):
        if field.name in exclude:
            continue
        scalar, is_sequence = _field_type(field, config_cls)
        default_text = f" (default: {field.default})" if field.default is not dataclasses.MISSING else ""
        kwargs = dict(dest=field.name, default=None, help=field.metadata.get("help", "") + default_text)
        if scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = scalar
            if is_sequence:
                kwargs["nargs"] = "+"
            if "choices" in field.metadata:
                kwargs["choices"] = field.metadata["choices"]
        group.add_argument(flag_name(field.name), **kwargs)
    if _is_engine_config(config_cls):
        group.add_argument("--backend", choices=BACKENDS, default=None,
                           help="LMDeploy's engine choice, accepted for its scripts: tidemind has one engine, "
                                "which takes both engines' settings")


def config_from_args(config_cls, args: argparse.Namespace, base: Optional[object] = None):
    """Build `config_cls` from the flags the user gave (others keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
             if getattr(args, f.name, None) is not None}
    if _is_engine_config(config_cls) and getattr(args, "backend", None):
        logger.warning("--backend %s: tidemind has one engine, which serves both of LMDeploy's backends' "
                       "settings; the flag changes nothing", args.backend)
    if base is not None:
        return dataclasses.replace(base, **given)
    return config_cls(**given)


def _is_engine_config(config_cls) -> bool:
    from .config import EngineConfig

    return issubclass(config_cls, EngineConfig)
