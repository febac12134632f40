"""The engine at tensor-parallel size 2 on the CPU (gloo, worker processes) on a tiny random Llama:
greedy outputs through pipeline() equal tp 1's, batched and under preemption with chunked prefill
(so that the ranks' KV caches, block tables and persistent batches stay in step through departures
and re-admissions), and `tidemind chat --tp 2`. Starts in seconds; the bundled models at tp > 1 are in test_tp_e2e.py."""
from __future__ import annotations

import functools
import subprocess
import sys
import time

import pytest

from tp_helpers import tiny_prompts, tiny_tp_model
from tidemind import EngineConfig, GenerationConfig, pipeline

GREEDY = GenerationConfig(max_new_tokens=24, ignore_eos=True)
PROMPTS = tiny_prompts(6)
# 8 blocks of 8 tokens for 6 sequences of 36-41 tokens: requests are preempted and recomputed, and a
# 16-token budget prefills prompts in chunks beside other requests' decodes.
SMALL = dict(num_gpu_blocks=12, cache_block_seq_len=8, max_prefill_token_num=16)


def _config(**fields) -> EngineConfig:
    return EngineConfig(dtype="float32", device="cpu", session_len=96, **fields)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_tp_model(str(tmp_path_factory.mktemp("tiny-tp")))


@functools.lru_cache(maxsize=None)
def _reference(model: str):
    with pipeline(model, backend_config=_config()) as pipe:
        return [r.token_ids for r in pipe(PROMPTS, GREEDY)]


def test_tp2_greedy_equals_tp1_batched_and_under_preemption(model):
    with pipeline(model, backend_config=_config(tp=2)) as pipe:
        batched = [r.token_ids for r in pipe(PROMPTS, GREEDY)]
        assert pipe.engine.executor.description.endswith("tp 2 (gloo, mp workers)")
    with pipeline(model, backend_config=_config(tp=2, **SMALL)) as pipe:
        preempted = [r.token_ids for r in pipe(PROMPTS, GREEDY)]
        stats = pipe.engine.stats()
    expected = _reference(model)
    assert all(len(t) == GREEDY.max_new_tokens for t in expected)
    assert batched == expected
    assert preempted == expected
    assert stats["num_preemptions"] > 0


def test_tp2_overlapped_steps_equal_tp1(model):
    # The engine sends step N+1 to the ranks before it reads step N's answer (on by default on a GPU).
    with pipeline(model, backend_config=_config(tp=2, overlap_schedule=True, **SMALL)) as pipe:
        assert pipe.engine.overlap
        overlapped = [r.token_ids for r in pipe(PROMPTS, GREEDY)]
        stats = pipe.engine.stats()
    assert overlapped == _reference(model)
    assert stats["num_preemptions"] > 0


def test_tp2_overlapped_departures_of_empty_steps_reach_the_ranks(model):
    # Each lone request is aborted, so the step after it runs nothing: its departure goes to the
    # ranks with the next step, or their batch rows (max_batch_size of them) run out.
    with pipeline(model, backend_config=_config(tp=2, overlap_schedule=True, max_batch_size=2)) as pipe:
        for _ in range(4):
            outputs = pipe.async_engine.stream(pipe.encode_prompt(PROMPTS[0]), GREEDY.replace(max_new_tokens=50))
            next(outputs)
            outputs.close()
            manager, deadline = pipe.engine.block_manager, time.monotonic() + 10
            while manager.num_free_blocks < manager.num_total_blocks and time.monotonic() < deadline:
                time.sleep(0.01)  # the abort applied (an empty step) before the next request comes
        assert [r.token_ids for r in pipe(PROMPTS[:2], GREEDY)] == _reference(model)[:2]


def test_tp_that_does_not_divide_the_heads_is_refused_before_any_worker_starts(model):
    with pytest.raises(ValueError, match=r"num_attention_heads=4 is not divisible by tp=3, .* use a tp that "
                                         r"divides it \(1, 2, 4\)"):
        pipeline(model, backend_config=_config(tp=3))


def test_pipeline_takes_tp_as_a_keyword_like_lmdeploy(model):
    with pipeline(model, tp=2, dtype="float32", device="cpu", session_len=96) as pipe:
        assert pipe.engine.config.tp == 2
        assert [pipe(PROMPTS[0], GREEDY).token_ids] == _reference(model)[:1]


def _chat(model: str, *flags: str) -> str:
    """stdout of `tidemind chat MODEL ...` answering two lines (one answer per input line)."""
    command = [sys.executable, "-m", "tidemind.cli.main", "chat", model, "--device", "cpu", "--dtype", "float32",
               "--session-len", "96", "--chat-template", "base", *flags]
    done = subprocess.run(command, input="\n".join(PROMPTS[:2]) + "\n", capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_chat_at_tp2_answers_like_tp1(model):
    expected = _chat(model)
    assert len(expected.split()) > 20
    assert _chat(model, "--tp", "2") == expected


def test_tp2_ranks_report_their_step_phases_and_kernels(model):
    # The measuring hooks of benchmarks/gpu_tp.py: per rank, where step time went and which kernels ran.
    with pipeline(model, backend_config=_config(tp=2)) as pipe:
        executor = pipe.engine.executor
        executor.rank_step_phases()  # from zero
        executor.profile_ranks(True)
        pipe(PROMPTS[:2], GREEDY)
        profiles = executor.profile_ranks(False, top=50)
        phases = executor.rank_step_phases()
        ms = executor.timing.per_step_ms()
    assert len(phases) == 2 and all(set(p) == {"launch", "collect", "idle"} for p in phases)  # no device clock
    assert all(p["launch"] > 0 for p in phases)
    assert ms["apart"] > 0 and ms["worker"] > 0
    assert len(profiles) == 2
    for profile in profiles:  # each rank ran its own model: its all-reduces and matmuls are there
        names = " ".join(name for name, _ in profile["kernels"])
        assert "all_reduce" in names and "linear" in names
