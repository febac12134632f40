"""Tensor parallelism over a Ray cluster: one Ray actor per rank (`--distributed-executor-backend ray`).

Ranks are placed with a placement group of tp bundles, one per rank ({"GPU": 1, "CPU": 1} on GPUs,
{"CPU": 1} on the CPU), strategy PACK: as few nodes as hold them, spanning nodes when one node cannot.
Bundle r holds rank r, so rank 0 lives where bundle 0 was placed; the ranks meet at rank 0's node
address and a port free there (or dist_init_addr), with NCCL / gloo as on one machine
(runner/distributed.py). Each actor holds a runner/worker.Worker and answers the same calls as a
worker process does; Ray gives an actor its one GPU as CUDA device 0 (local_rank 0).

The driver joins the cluster named by RAY_ADDRESS, or a cluster started on this machine with `ray
start --head`, or else starts a local one (ray.init's own rule). Every node must be able to import
the same tidemind and load the model from the same path (a shared file system, or the same copy on
each node); docs/SERVING.md says how to start a cluster.

Failures: an actor that dies (its process exits, its node goes away) fails the call waiting on it
at once (RayActorError); while no step runs, each actor's sentinel call (it blocks in a second
thread of the actor until the actor ends) resolves with that error, which a watcher thread turns
into the executor's failure. A rank that does not answer within the call's timeout is declared hung
and every actor is killed, as with worker processes.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any, Deque, List, Optional

from ..config import EngineConfig
from ..core.outputs import SchedulerOutput
from .distributed_executor import DistributedExecutor, rank_list

logger = logging.getLogger("tidemind")

# Environment passed to every actor (the driver's values, when it has them): fault plans for tests,
# NCCL settings, and where this tidemind lives.
_PASSED_ENV = ("TIDEMIND_INJECT_FAULTS", "NCCL_NVLS_ENABLE", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
               "NCCL_DEBUG", "TIDEMIND_CACHE_DIR", "HF_HOME")
# How long an error raised by a rank's collective waits for news of a peer's death (see _dead_rank).
_DEATH_NOTICE_GRACE_S = 5.0


def _import_ray():
    try:
        import ray
    except ModuleNotFoundError:
        raise RuntimeError("--distributed-executor-backend ray needs Ray, which is not installed: "
                           "pip install 'tidemind[ray]' (on every node of the cluster)") from None
    return ray


class _RankActor:
    """The body of one rank's actor (made a Ray actor class in _actor_class, so that importing this
    module never needs Ray)."""

    def __init__(self):
        self.worker = None
        self._ended = threading.Event()

    def node(self) -> tuple:
        """(node id, node address, a TCP port free there now): rank 0's answer is the rendezvous."""
        import ray

        from ..runner.distributed import free_port

        address = ray.util.get_node_ip_address()
        return ray.get_runtime_context().get_node_id(), address, free_port(address)

    def start(self, init):
        from ..runner.worker import Worker
        from .faults import FAULTS

        start = time.perf_counter()
        point = f"rank{init.rank}.step"
        self.worker = Worker(init, lambda: FAULTS.check(point))
        return self.worker.info, time.perf_counter() - start

    def call(self, method: str, *args):
        start = time.perf_counter()
        result = getattr(self.worker, method)(*args)
        return result, time.perf_counter() - start

    def sentinel(self) -> None:
        """Blocks (in the actor's second thread) until the actor ends: its failure is the news."""
        self._ended.wait()


def _actor_class(ray):
    # max_concurrency 2: the sentinel blocks one thread, calls run in the other, in order
    return ray.remote(max_concurrency=2)(_RankActor)


class RayExecutor(DistributedExecutor):
    kind = "ray"
    # A rank's calls run on its actor's one free thread (the sentinel holds the other); Ray does not
    # promise a threaded actor runs them in the order sent, so steps are not sent ahead.
    supports_overlap = False

    def _start(self, model_path: str, config: EngineConfig) -> list:
        from ..runner.worker import WorkerInit
        from .mp_executor import resolved_device_type, worker_env

        ray = self.ray = _import_ray()
        self._step_refs: Deque[List[Any]] = deque()  # per step sent and not yet collected: one ref per rank
        self._owns_ray = not ray.is_initialized()  # a cluster joined (or started) here is left at close
        if self._owns_ray:
            ray.init(logging_level=logging.WARNING)
        device_type = resolved_device_type(config)
        self.placement_group = self._place(ray, device_type)
        env = {key: value for key, value in worker_env().items() if key in _PASSED_ENV or key == "PYTHONPATH"}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as strategy

        actor_cls = _actor_class(ray)
        self.actors = [actor_cls.options(
            num_cpus=1, num_gpus=1 if device_type == "cuda" else 0, runtime_env={"env_vars": env},
            scheduling_strategy=strategy(placement_group=self.placement_group, placement_group_bundle_index=rank),
        ).remote() for rank in range(self.size)]
        nodes = self._wait([a.node.remote() for a in self.actors], "start-up (placing the ranks)",
                           self.timeout_of("init"))
        self.node_ids = [node_id for node_id, _, _ in nodes]
        address = config.dist_init_addr or f"{nodes[0][1]}:{nodes[0][2]}"
        logger.info("tensor-parallel ranks on Ray nodes %s; they meet at %s",
                    ", ".join(f"{r}: {n[1]}" for r, n in enumerate(nodes)), address)
        threads = config.num_threads or (1 if device_type == "cpu" else 0)  # one CPU per bundle
        level = logging.getLogger("tidemind").getEffectiveLevel()
        starts = [actor.start.remote(WorkerInit(rank, self.size, 0, address, model_path, config, threads, level))
                  for rank, actor in enumerate(self.actors)]
        infos = [info for info, _ in self._wait(starts, "start-up (loading the model)", self.timeout_of("init"))]
        self._sentinels = {actor.sentinel.remote(): rank for rank, actor in enumerate(self.actors)}
        threading.Thread(target=self._watch, name="tidemind-tp-ray-watch", daemon=True).start()
        return infos

    def _place(self, ray, device_type: str):
        bundle = {"GPU": 1, "CPU": 1} if device_type == "cuda" else {"CPU": 1}
        group = ray.util.placement_group([dict(bundle) for _ in range(self.size)], strategy="PACK")
        # placing is quick or impossible (until nodes join): bounded by the step timeout, not start-up's
        ready, _ = ray.wait([group.ready()], timeout=self.timeout_s)
        if not ready:
            ray.util.remove_placement_group(group)
            raise RuntimeError(f"the Ray cluster cannot place {self.size} ranks of {bundle} within "
                               f"{self.timeout_s:g} s (--distributed-timeout; cluster resources: "
                               f"{ray.cluster_resources()}): add nodes (ray start --address HEAD:PORT on each), "
                               f"or lower --tp")
        return group

    # ---- calls ------------------------------------------------------------------------------------
    def _wait(self, refs: List[Any], what: str, timeout_s: float, answering: Optional[List[int]] = None) -> list:
        """Results of `refs` (one per rank, in rank order); a rank's death, error or a wait longer
        than timeout_s makes the executor dead. `answering`: the ranks whose results are returned."""
        ray = self.ray
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending, results = list(refs), {}
        deadline = time.monotonic() + timeout_s
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                late = sorted(rank_of[ref] for ref in pending)
                raise self._fail(f"tensor-parallel rank(s) {rank_list(late)} did not answer {what} within "
                                 f"{timeout_s:g} s: a rank hangs")
            for ref in done:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    raise self._fail(f"tensor-parallel rank {rank} (Ray actor) died: "
                                     f"{str(exc).strip().splitlines()[0]}") from None
                except ray.exceptions.RayTaskError as exc:
                    text = str(exc)
                    dead = self._dead_rank(min(_DEATH_NOTICE_GRACE_S, timeout_s))
                    if dead is not None:  # the error is the peer's death, seen first through a collective
                        raise self._fail(f"tensor-parallel rank {dead} (Ray actor) died; rank {rank}'s "
                                         f"collective failed with it", text) from None
                    raise self._fail(f"tensor-parallel rank {rank} failed: {text.strip().splitlines()[-1]}",
                                     text) from None
        return [results[rank] for rank in (answering if answering is not None else range(len(refs)))]

    def _dead_rank(self, grace_s: float) -> Optional[int]:
        """A rank whose actor died, waiting up to grace_s for Ray to notice; None if every actor lives.
        A rank that dies mid-step breaks its peers' collectives (gloo: connection reset) before Ray
        reports the death, so an error raised by a live rank is first checked against this."""
        sentinels = getattr(self, "_sentinels", None)
        if not sentinels:  # still starting: no sentinel calls yet
            return None
        done, _ = self.ray.wait(list(sentinels), num_returns=1, timeout=grace_s)
        return sentinels[done[0]] if done else None

    def _call_all(self, method: str, *args) -> list:
        refs = [actor.call.remote(method, *args) for actor in self.actors]
        return [result for result, _ in self._wait(refs, method, self.timeout_of(method))]

    def _send_step(self, scheduled: SchedulerOutput) -> None:
        ref = self.ray.put(scheduled)  # serialized once, read by every rank
        # an actor runs one caller's calls in the order they were made
        self._step_refs.append([actor.call.remote("execute", ref) for actor in self.actors])

    def _receive_step(self) -> tuple:
        # every rank's answer (None but rank 0's) so that any rank's error is seen in this step
        return self._wait(self._step_refs.popleft(), "a step", self.timeout_s, answering=[0])[0]

    def close(self) -> None:
        super().close()
        if getattr(self, "_owns_ray", False) and self.ray.is_initialized():
            self.ray.shutdown()

    # ---- failures and the end ---------------------------------------------------------------------
    def _watch(self) -> None:
        ray = self.ray
        try:
            done, _ = ray.wait(list(self._sentinels), num_returns=1, timeout=None)
        except Exception:  # Ray itself shut down under us (the driver is exiting)
            return
        rank = self._sentinels[done[0]]
        if not self._closing and self.failure is None:
            self._fail(f"tensor-parallel rank {rank} (Ray actor on node {self.node_ids[rank][:12]}) died")

    def _stop_ranks(self, graceful: bool) -> None:
        ray = getattr(self, "ray", None)
        if ray is None or not ray.is_initialized():
            return
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor, no_restart=True)  # graceful or not: close() already ran on every rank
            except Exception:
                pass
        group = getattr(self, "placement_group", None)
        if group is not None:
            try:
                ray.util.remove_placement_group(group)
            except Exception:
                pass
            self.placement_group = None
