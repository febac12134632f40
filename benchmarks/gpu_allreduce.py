"""All-reduce latency between the GPUs of one host (benchmarks/gpu_run.sh stage allreduce, on nvidia-h200-x2):
what a tensor-parallel decode step pays for each of its 2 x num_layers all-reduces, by implementation.

    python benchmarks/gpu_allreduce.py [WORLD_SIZE]      # default: every visible GPU

For bf16 activations of hidden 4096 at 1 to 4,096 rows, each implementation is checked (the sum of every
rank's tensor, exactly: small integers), eagerly and replayed from a CUDA graph, and timed two ways:
eager (a loop of launches, one sync at the end) and replayed from a CUDA graph of 32 calls (how decode
steps run). Implementations:
  nccl           torch.distributed.all_reduce (NCCL, NVLS off)
  one_shot       torch.ops.symm_mem.one_shot_all_reduce: every rank reads all peers' buffers over NVLink
  two_shot       torch.ops.symm_mem.two_shot_all_reduce_: reduce-scatter then all-gather, in place
  tm_one_shot    tidemind's one-shot path (runner/distributed.py SymmetricAllReduce) at every size: one
                 kernel copies the input into the mapped buffer and sums every rank's into a new tensor
  tm_two_shot    tidemind's two-shot path at every size: copy in, two-shot into the input tensor
  tm_auto        tidemind's all-reduce as the engine runs it (one-shot up to 1 MiB at tp 2)
Each figure goes to $OUT/results.jsonl (workload "allreduce"), as the other GPU scripts' do.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN = 4096
ROWS = [int(r) for r in os.environ.get("AR_ROWS", "1 8 32 128 256 1024 4096").split()]
GRAPH_CALLS = 32
REPS = 20


def _record(**fields) -> None:
    fields.update(time=time.strftime("%Y-%m-%dT%H:%M:%S"), device=torch.cuda.get_device_name(0),
                  cmd="python benchmarks/gpu_allreduce.py " + " ".join(sys.argv[1:]))
    line = json.dumps(fields)
    print("RESULT", line, flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "results.jsonl"), "a") as f:
        f.write(line + "\n")


def _implementations(group_name: str):
    """name -> (make the input buffer for `rows`, all-reduce it and return the sum)."""
    from torch.distributed import _symmetric_memory as symm_mem

    def plain(rows):
        return torch.empty(rows, HIDDEN, dtype=torch.bfloat16, device="cuda")

    def symmetric(rows):
        buf = symm_mem.empty(rows, HIDDEN, dtype=torch.bfloat16, device="cuda")
        symm_mem.rendezvous(buf, group_name)
        return buf

    def nccl(x):
        dist.all_reduce(x)
        return x

    def one_shot(x):
        return torch.ops.symm_mem.one_shot_all_reduce(x, "sum", group_name)

    def two_shot(x):
        torch.ops.symm_mem.two_shot_all_reduce_(x, "sum", group_name)
        return x

    from tidemind.runner.distributed import SymmetricAllReduce

    device, max_bytes = torch.device("cuda", torch.cuda.current_device()), max(ROWS) * HIDDEN * 2
    paths = {"tm_auto": SymmetricAllReduce(group_name, dist.get_world_size(), device, max_bytes),
             "tm_one_shot": SymmetricAllReduce(group_name, dist.get_world_size(), device, max_bytes, max_bytes),
             "tm_two_shot": SymmetricAllReduce(group_name, dist.get_world_size(), device, max_bytes, 0)}
    impls = {"nccl": (plain, nccl), "one_shot": (symmetric, one_shot), "two_shot": (symmetric, two_shot)}
    impls.update({name: (plain, path) for name, path in paths.items()})
    return impls


def _check_in_graph(fn, x, value, expected) -> bool:
    """Capture one fill and all-reduce, replay it, compare the sum."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.fill_(value)
        out = fn(x)
    graph.replay()
    torch.cuda.synchronize()
    return bool((out == expected).all())


def _time_eager(fn, x, value) -> float:
    for _ in range(3):
        x.fill_(value)
        fn(x)
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(REPS * GRAPH_CALLS):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (REPS * GRAPH_CALLS)


def _time_graph(fn, x) -> float:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(REPS):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (REPS * GRAPH_CALLS)


def _worker(rank: int, world: int, port: int) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    group_name = dist.group.WORLD.group_name
    for name, (make, fn) in _implementations(group_name).items():
        for rows in ROWS:
            try:
                x = make(rows)
                x.fill_(rank + 1)
                out = fn(x)
                torch.cuda.synchronize()
                expected = world * (world + 1) / 2
                ok = bool((out == expected).all()) and _check_in_graph(fn, x, rank + 1, expected)
                eager = _time_eager(fn, x, rank + 1)
                graph = _time_graph(fn, x)
                fields = dict(ok=ok, eager_us=1e6 * eager, graph_us=1e6 * graph)
            except Exception as exc:  # an implementation this torch or machine lacks: say so, go on
                fields = dict(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
                torch.cuda.synchronize()
            if rank == 0:
                _record(system="torch", workload="allreduce", impl=name, world=world, rows=rows,
                        bytes=rows * HIDDEN * 2, **fields)
            dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    world = int(sys.argv[1]) if len(sys.argv) > 1 else torch.cuda.device_count()
    if world < 2:
        sys.exit(f"all-reduce needs at least 2 GPUs; this machine shows {torch.cuda.device_count()}")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from tidemind.runner.distributed import free_port

    mp.spawn(_worker, args=(world, free_port("127.0.0.1")), nprocs=world, join=True)


if __name__ == "__main__":
    main()
