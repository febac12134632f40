"""Calibration and evaluation text: a file, or a named data set shipped with tidemind.

Names resolve to $TIDEMIND_DATA_DIR/<full file> when that exists (the full texts of the project's
shared data directory), else to the excerpt shipped in tidemind/lite/data/ (README.md there says
what each holds). Nothing is downloaded.
"""
from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from typing import List, Tuple

import torch

logger = logging.getLogger("tidemind")

DATA_DIR_ENV = "TIDEMIND_DATA_DIR"
_PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@dataclass(frozen=True)
class DataSet:
    name: str
    full_file: str  # looked for in $TIDEMIND_DATA_DIR
    excerpt: str  # shipped in tidemind/lite/data/
    use: str


DATASETS = {d.name: d for d in (
    DataSet("war-and-peace", "war-and-peace.txt", "war-and-peace-book-one.txt.gz",
            "calibration (the default); public domain"),
    DataSet("wikitext2", "wikitext-2-raw-test.txt", "wikitext-2-raw-test-head.txt.gz",
            "evaluation (P1 perplexity); do not calibrate on it"),
)}


def dataset_choices() -> str:
    return ", ".join(f"{d.name} ({d.use})" for d in DATASETS.values())


def load_text(dataset: str) -> Tuple[str, str]:
    """(text, where it came from) of a file path or a data set name."""
    if dataset in DATASETS:
        entry = DATASETS[dataset]
        data_dir = os.environ.get(DATA_DIR_ENV)
        if data_dir and os.path.isfile(os.path.join(data_dir, entry.full_file)):
            path = os.path.join(data_dir, entry.full_file)
            with open(path, encoding="utf-8") as f:
                return f.read(), path
        path = os.path.join(_PACKAGED, entry.excerpt)
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read(), f"{entry.name} (excerpt shipped with tidemind)"
    if os.path.isfile(dataset):
        try:
            with open(dataset, encoding="utf-8") as f:
                return f.read(), dataset
        except UnicodeDecodeError:
            raise ValueError(f"{dataset!r} is not UTF-8 text; pass a plain text file") from None
    looks_like_path = os.sep in dataset or "." in os.path.basename(dataset)
    if looks_like_path:
        raise FileNotFoundError(f"text file {dataset!r} does not exist; pass an existing UTF-8 text file or one "
                                f"of: {dataset_choices()}")
    raise ValueError(f"unknown data set {dataset!r}; pass a UTF-8 text file or one of: {dataset_choices()}")


def check_dataset(dataset: str) -> None:
    """Fail fast (before any model work) on a name or path load_text would refuse."""
    if dataset not in DATASETS:
        load_text(dataset)


def calibration_windows(token_ids: List[int], bos_ids: List[int], num_samples: int, seq_len: int,
                        seed: int = 0) -> torch.Tensor:
    """[num_samples, seq_len] int64 windows of the text at random (seeded) offsets, each starting
    with the tokenizer's BOS tokens when it adds any (as a prompt would). Windows overlap when the
    text holds fewer than num_samples * seq_len tokens."""
    body = seq_len - len(bos_ids)
    if len(token_ids) < body:
        raise ValueError(f"the calibration text has {len(token_ids)} tokens, fewer than --calib-seqlen {seq_len}; "
                         f"use a longer text or a shorter --calib-seqlen")
    if num_samples * body > len(token_ids):
        logger.warning("the calibration text has %d tokens, fewer than %d samples x %d: windows overlap",
                       len(token_ids), num_samples, body)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(token_ids) - body + 1, (num_samples,), generator=gen).tolist()
    ids = torch.tensor(token_ids, dtype=torch.int64)
    prefix = torch.tensor(bos_ids, dtype=torch.int64)
    return torch.stack([torch.cat([prefix, ids[s:s + body]]) for s in starts])
