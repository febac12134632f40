"""Tensor parallelism on a Ray cluster (`--distributed-executor-backend ray`): a local cluster of a
head node and one worker node (ray.cluster_utils.Cluster: two raylets on this machine, at its own
address, one CPU each, so the placement group of two {"CPU": 1} bundles must span both), a tiny
Llama at tp 2 with one rank on each node: greedy outputs equal tp 1's; a rank whose actor dies
mid-step fails every in-flight request. Skipped without Ray (pip install 'tidemind[ray]')."""
from __future__ import annotations

import queue
import time

import pytest

from tp_helpers import tiny_prompts, tiny_tp_model
from tidemind import EngineConfig, GenerationConfig, pipeline

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'tidemind[ray]'")

GREEDY = GenerationConfig(max_new_tokens=24, ignore_eos=True)
PROMPTS = tiny_prompts(4)


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_tp_model(str(tmp_path_factory.mktemp("tiny-tp")))


def _config(**fields) -> EngineConfig:
    return EngineConfig(dtype="float32", device="cpu", session_len=96, **fields)


def test_tp2_over_two_ray_nodes_answers_like_tp1(cluster, model):
    with pipeline(model, backend_config=_config()) as pipe:
        expected = [r.token_ids for r in pipe(PROMPTS, GREEDY)]
    with pipeline(model, backend_config=_config(tp=2, distributed_executor_backend="ray")) as pipe:
        executor = pipe.engine.executor
        assert len(set(executor.node_ids)) == 2, "the two ranks should sit on the two nodes"
        assert executor.description.endswith("tp 2 (gloo, ray workers)")
        got = [r.token_ids for r in pipe(PROMPTS, GREEDY)]
    assert got == expected
    assert ray.util.placement_group_table() and all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_a_ray_rank_that_dies_mid_step_fails_every_in_flight_request(cluster, model, monkeypatch):
    monkeypatch.setenv("TIDEMIND_INJECT_FAULTS", "rank1.step=3:exit")
    with pipeline(model, backend_config=_config(tp=2, distributed_executor_backend="ray",
                                                distributed_timeout=10)) as pipe:
        sinks = [queue.SimpleQueue() for _ in PROMPTS]
        start = time.monotonic()
        for prompt, sink in zip(PROMPTS, sinks):
            pipe.async_engine.submit(pipe.tokenizer.encode(prompt), GREEDY, sink.put)
        finals = []
        for sink in sinks:
            out = sink.get(timeout=60)
            while not out.finished:
                out = sink.get(timeout=60)
            finals.append(out)
        assert all(out.finish_reason == "error" for out in finals)
        assert time.monotonic() - start < 30
        assert "rank 1" in pipe.async_engine.failure


def test_ranks_the_cluster_cannot_place_are_refused_naming_its_resources(cluster, model):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"cannot place 4 ranks of \{'CPU': 1\} within 3 s .*add nodes"):
        pipeline(model, backend_config=_config(tp=4, distributed_executor_backend="ray", distributed_timeout=3))
    assert time.monotonic() - start < 30
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
