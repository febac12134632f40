"""The entry point of a tensor-parallel worker process (engine/mp_executor.py starts it):

    python -m tidemind.engine.worker_process --fd N

N is the worker's end of a socket pair with the executor; runner/worker_loop.serve() runs the loop, with
this rank's fault point ("rank<N>.step", engine/faults.py) checked before every step.
"""
from __future__ import annotations

import argparse
import sys
from multiprocessing.connection import Connection

from ..runner.worker_loop import serve
from .faults import FAULTS


def _fault_point(rank: int):
    point = f"rank{rank}.step"
    return lambda: FAULTS.check(point)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="a tidemind tensor-parallel worker (started by the engine)")
    parser.add_argument("--fd", type=int, required=True, help="file descriptor of the executor's socket")
    args = parser.parse_args(argv)
    with Connection(args.fd) as conn:
        return serve(conn, _fault_point)


if __name__ == "__main__":
    sys.exit(main())
