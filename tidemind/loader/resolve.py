"""What the user typed as MODEL -> a Hugging Face-format directory the loader can read.

GGUF files (bundled or not) are converted once into a cache directory keyed by the file's
absolute path, size and mtime, one per form (loader/gguf.py: dequantized, or at stored precision):
    $TIDEMIND_CACHE_DIR (default ~/.cache/tidemind) / gguf / <stem>-<key>[-stored] /
A conversion writes into a temporary sibling and renames it into place, so a cache directory that
exists is complete.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from ..chat.tokenizer import check_tokenizer_files
from . import gguf as gguf_convert
from .bundled import DEFAULT_MODEL, bundled_names, find_bundled
from .checkpoint import model_class_for, read_hf_config

logger = logging.getLogger(__name__)

CACHE_ENV = "TIDEMIND_CACHE_DIR"
STALE_TMP_S = 24 * 3600  # a temporary conversion untouched this long was left by a killed process


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # a Hugging Face-format directory: config.json, *.safetensors, tokenizer files
    name: str  # short display name: the bundled name, the GGUF file stem or the directory name
    source: str  # "bundled" (a bundled GGUF), "gguf" (a user GGUF file) or "hf" (a directory)
    gguf_path: Optional[str] = None  # the GGUF file, for "bundled" and "gguf"


def cache_root() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/tidemind"))


def gguf_cache_dir(gguf_path: str, keep_quantized: bool = False) -> str:
    """Where the conversion of this exact file (path, size, mtime) lives, in the form asked for."""
    path = os.path.abspath(gguf_path)
    stat = os.stat(path)
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_root(), "gguf", f"{stem}-{key}{'-stored' if keep_quantized else ''}")


def convert_gguf_cached(gguf_path: str, keep_quantized: bool = False) -> str:
    target = gguf_cache_dir(gguf_path, keep_quantized)
    if os.path.isfile(os.path.join(target, "config.json")):
        logger.info("reusing the converted %s from %s", os.path.basename(gguf_path), target)
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(os.path.join(parent, f".tmp-{os.path.basename(target)}-*")):
        if time.time() - os.path.getmtime(stale) > STALE_TMP_S:
            shutil.rmtree(stale, ignore_errors=True)
    logger.info("converting %s into %s (once; later runs reuse it)", gguf_path, target)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(target)}-", dir=parent)
    try:
        gguf_convert.convert_gguf(gguf_path, tmp, keep_quantized)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
            logger.info("another process converted %s meanwhile; using its copy", gguf_path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_path(model: str, keep_quantized: bool) -> ResolvedModel:
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"{model!r} is a file but not a .gguf file; pass a .gguf file or a directory with "
                             f"config.json and *.safetensors")
        name = os.path.splitext(os.path.basename(path))[0]
        return ResolvedModel(path=convert_gguf_cached(path, keep_quantized), name=name, source="gguf",
                             gguf_path=path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if ggufs:
            raise FileNotFoundError(f"{model!r} has no config.json but holds {', '.join(ggufs[:3])}; pass the "
                                    f".gguf file itself, e.g. {os.path.join(model, ggufs[0])}")
    check_hf_dir(path)
    return ResolvedModel(path=path, name=os.path.basename(path.rstrip(os.sep)), source="hf")


def check_hf_dir(path: str) -> None:
    """What can be checked of a model directory in milliseconds, before anything is loaded from it:
    config.json (UTF-8, JSON, value types, a supported architecture) and the tokenizer's files."""
    model_class_for(read_hf_config(path), path)
    check_tokenizer_files(path)


def gguf_file_of(model: Optional[str]) -> Optional[str]:
    """The GGUF file `model` names (None, a bundled name or a .gguf path), else None; converts nothing."""
    if model is None:
        model = DEFAULT_MODEL
    entry = find_bundled(model)
    if entry is not None and not os.path.exists(model):
        return entry.locate()
    path = os.path.abspath(os.path.expanduser(model))
    return path if os.path.isfile(path) and path.endswith(".gguf") else None


def resolve_model(model: Optional[str], keep_quantized: bool = False) -> ResolvedModel:
    """None -> the default bundled model; a bundled name; a .gguf file; or a model directory.
    keep_quantized: a GGUF becomes a directory at its stored precision (loader/gguf.py), not
    float32; the caller checked that it can (gguf.stored_precision_blocker)."""
    if model is None:
        model = DEFAULT_MODEL
    entry = find_bundled(model)
    if entry is not None and not os.path.exists(model):
        gguf_path = entry.locate()
        return ResolvedModel(path=convert_gguf_cached(gguf_path, keep_quantized), name=entry.name, source="bundled",
                             gguf_path=gguf_path)
    if not os.path.exists(os.path.expanduser(model)):
        raise FileNotFoundError(f"model {model!r} is neither a bundled model ({', '.join(bundled_names())}) nor "
                                f"an existing path; pass a directory with config.json and *.safetensors, "
                                f"a .gguf file, or one of the bundled names (see `tidemind list`)")
    return _resolve_path(model, keep_quantized)
