"""Helpers of the tensor-parallel tests: a rank without peers, ranks as real processes over gloo, and
a tp-aware run of the paged-KV driver of model_factory.py."""
from __future__ import annotations

import os
import socket
from typing import Dict, List, Sequence, Tuple

import torch
import torch.multiprocessing as mp

from model_factory import PagedKV, run_step
from tidemind.layers.context import BuildContext
from tidemind.layers.parallel import TPGroup, kv_heads_of_rank
from tidemind.loader import load_model

CPU = torch.device("cpu")


class SoloRank(TPGroup):
    """Rank `rank` of `size` with identity collectives: enough to build, load and apply one rank's
    layers alone (its partial results, never a whole forward pass)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size, self.backend = rank, size, "solo"

    def all_reduce(self, x):
        return x

    all_reduce_max = broadcast = all_reduce

    def min_int(self, value: int) -> int:
        return value


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def rank_cache_config(model_config, group: TPGroup):
    """The model config with this rank's kv heads (what its KV cache holds)."""
    import dataclasses

    _, kv = kv_heads_of_rank(model_config.num_attention_heads, model_config.num_kv_heads, group.rank, group.size)
    return dataclasses.replace(model_config, num_kv_heads=kv)


def steps_logits(model, model_config, group: TPGroup, toks: Sequence[int]) -> torch.Tensor:
    """Logits of a fixed schedule: two prefill chunks of sequence 0, a mixed step (a decode of 0 and
    a prefill of 1), then batched decodes: [rows, vocab] float32."""
    kv = PagedKV(rank_cache_config(model_config, group), seed=2)
    other = [t + 1 for t in toks[:9]]
    rows = run_step(model, kv, [(0, toks[:7])]) + run_step(model, kv, [(0, toks[7:15])])
    rows += run_step(model, kv, [(0, toks[15:16]), (1, other)])
    for i in range(16, len(toks)):
        rows += run_step(model, kv, [(0, toks[i:i + 1]), (1, [toks[i]])])
    return torch.cat(rows)


def _rank_main(rank: int, size: int, address: str, jobs: List[Tuple[str, str, str]], toks, out_path: str):
    """One rank: join the gloo group, then for each (name, model dir, mode) load this rank's slice and
    run steps_logits; rank 0 saves {name: logits}. mode "no_row_reduce" drops the row-parallel
    all-reduce (a broken tensor parallelism the comparison must catch)."""
    import torch.distributed as dist

    from tidemind.runner.distributed import destroy_tp_group, init_tp_group

    torch.set_num_threads(1)
    group = init_tp_group(rank, size, address, CPU, timeout_s=120)
    results: Dict[str, torch.Tensor] = {}
    for name, path, mode in jobs:
        model, model_config = load_model(path, torch.float32, CPU, BuildContext(tp_group=group))
        if mode == "no_row_reduce":
            for module in model.modules():
                if getattr(module, "parallel", None) == "row":
                    module.parallel = None  # applies its partial product alone, no all-reduce
        results[name] = steps_logits(model, model_config, group, toks)
    if rank == 0:
        torch.save(results, out_path)
    # Leave together and tear the group down before the interpreter exits: a rank that exits while
    # its peer still talks to it leaves gloo's threads joinable, and the process aborts ("terminate
    # called without an active exception", SIGABRT) though its work is done.
    dist.barrier()
    destroy_tp_group()


def run_ranks(size: int, jobs: List[Tuple[str, str, str]], toks: Sequence[int],
              out_dir: str) -> Dict[str, torch.Tensor]:
    """Run _rank_main in `size` spawned processes; rank 0's results."""
    out_path = os.path.join(out_dir, f"tp{size}_logits.pt")
    mp.start_processes(_rank_main, args=(size, free_address(), jobs, list(toks), out_path), nprocs=size,
                       join=True, start_method="spawn")
    return torch.load(out_path)


def tp1_logits(path: str, toks: Sequence[int]) -> torch.Tensor:
    model, model_config = load_model(path, torch.float32, CPU)
    return steps_logits(model, model_config, TPGroup(), toks)


def tiny_tp_model(path: str) -> str:
    """A tiny random Llama (4 query heads on 2 kv heads, intermediate 96: splits over 2 ranks) with a
    word-level tokenizer ("t0 t5 t17" are token ids 0, 5, 17), for tests of the engine and server at
    tp 2 that start in seconds."""
    from model_factory import make_hf_model, save_tiny_tokenizer

    make_hf_model("llama", path, seed=5)
    save_tiny_tokenizer(path)
    return path


def tiny_prompts(count: int, length: int = 12, seed: int = 7) -> List[str]:
    """Texts of `count` random prompts for the tiny tokenizer (ids 3..249: never BOS / EOS / pad)."""
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(f"t{i}" for i in torch.randint(3, 250, (length + k,), generator=gen).tolist())
            for k in range(count)]
