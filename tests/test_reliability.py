"""The reliability suite (`tidemind bench reliability`, RELIABILITY.md) at the size CI runs: every
scenario starts real servers on the bundled SmolLM2 and its verdict must hold.

That the verdicts can fail is shown twice: the judging functions are fed broken results here (in
milliseconds), and the soak and the overload run against api_servers broken on purpose
(tests/sabotage/sitecustomize.py).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from tidemind.bench import reliability_faults, reliability_overload, reliability_proxy, reliability_soak
from tidemind.bench.local_servers import rss_bytes
from tidemind.bench.reliability import SCENARIOS, report, run_scenario
from tidemind.bench.reliability_cases import MAX_REQUEST_BYTES, corpus, mutants
from tidemind.bench.reliability_common import CHAT_PATH, ScenarioResult, StreamRecord

SABOTAGE_DIR = str(Path(__file__).parent / "sabotage")
RSS_CHECK = "RSS flat after the warm-up"


def _ok(text: str = "the answer", chunks: int = 3) -> StreamRecord:
    return StreamRecord(status=200, text=text, content_chunks=chunks, finish_reason="length", done=True,
                        sent_s=0.0, ended_s=1.0)


def _failed(result: ScenarioResult, label: str = "") -> set:
    """The names of the checks that failed, without their label ("burst: ", "round 2: ")."""
    return {name.split(": ", 1)[1] if label and name.startswith(label) else name for name in result.failed_checks()}


# ---------------------------------------------------------------------- the verdicts can fail (fast)
def test_soak_answers_verdicts_fail_on_a_wrong_text_a_5xx_and_a_client_that_stayed():
    solo = {(CHAT_PATH, 0): _ok(), (CHAT_PATH, 1): _ok("another answer")}
    planned = [reliability_soak.Planned((CHAT_PATH, 0), None), reliability_soak.Planned((CHAT_PATH, 1), None),
               reliability_soak.Planned((CHAT_PATH, 0), 1)]
    good = [_ok(), _ok("another answer"), replace(_ok(), hung_up=True, done=False)]
    result = ScenarioResult("soak", {})
    reliability_soak._judge_answers(result, planned, good, solo)
    assert result.passed, result.checks
    broken = [_ok(), _ok("another answe"), StreamRecord(status=500, error_body={"error": {}})]
    result = ScenarioResult("soak", {})
    reliability_soak._judge_answers(result, planned, broken, solo)
    assert _failed(result) == {"survivors equal their solo greedy text", "clients hung up mid-stream as planned",
                               "no 5xx, no error event, no refusal"}
    assert "'another answe'" in result.checks[0].detail


def test_soak_memory_verdicts_fail_on_growth_and_on_a_warm_up_that_did_not_fill_the_cache():
    settings = reliability_soak.SoakSettings(rss_bound_mib=32)
    mib = 2**20
    for preempted, growth, failed in [(3, 31 * mib, set()), (3, 33 * mib, {RSS_CHECK}),
                                      (0, 0, {"the warm-up filled the KV cache (a request was preempted)"})]:
        result = ScenarioResult("soak", {})
        reliability_soak._judge_memory(result, settings, preempted, 1000 * mib, 1000 * mib + growth, 100)
        assert {name.split(" (")[0] for name in result.failed_checks()} == {f.split(" (")[0] for f in failed}


def test_the_last_quarter_growth_tells_a_cache_that_levels_off_from_a_leak():
    mib = 2**20
    levelling = [(t, 1000 * mib + min(t, 60) * mib) for t in range(0, 101)]
    leaking = [(t, 1000 * mib + t * mib) for t in range(0, 101)]
    assert reliability_soak._last_quarter_growth(levelling) == 0
    assert reliability_soak._last_quarter_growth(leaking) == 25
    assert reliability_soak._last_quarter_growth(leaking[:3]) is None


def test_soak_plan_hangs_up_an_exact_share_always_before_the_end():
    settings = reliability_soak.SoakSettings(requests=50, hang_up_share=0.2)
    solo = {(CHAT_PATH, i): _ok("x" * i) for i in range(4)}  # one answer is empty: nobody hangs up on it
    planned = reliability_soak.plan(settings, solo)
    leavers = [p for p in planned if p.hang_up_after is not None]
    assert len(leavers) == 10 and all(0 <= p.hang_up_after < len(solo[p.key].text) for p in leavers)
    assert planned == reliability_soak.plan(settings, solo)  # seeded


def _refused(sent: float = 0.0, ended: float = 0.5, retry_after: str = "1") -> StreamRecord:
    return StreamRecord(status=429, headers={"retry-after": retry_after}, sent_s=sent, ended_s=ended,
                        error_body={"error": {"code": "rate_limit_exceeded"}})


@pytest.mark.parametrize("change, failed", [
    (None, set()),
    ("one more answered", {"exactly the limit answered, the rest 429"}),
    ("a refusal without Retry-After", {"every 429 says rate_limit_exceeded and Retry-After: 1"}),
    ("a refusal after the first answer", {"no refusal waited for a slot"}),
    ("a slow single refusal", {"a request over the limit is refused at once"}),
    ("a refusal not counted", {"/metrics counted the refusals"}),
])
def test_overload_verdicts_fail_on_each_broken_promise(change, failed):
    settings = reliability_overload.OverloadSettings(requests=6, limit=2, probes=2)
    served = [replace(_ok(), ended_s=5.0) for _ in range(2)]
    refused = [_refused() for _ in range(4)]
    probes = [_refused(1.0, 1.1), _refused(1.2, 1.3)]
    counted = 6
    if change == "one more answered":
        refused[0] = replace(_ok(), ended_s=5.0)
        counted = 5
    elif change == "a refusal without Retry-After":
        refused[1] = _refused(retry_after="")
    elif change == "a refusal after the first answer":
        refused[2] = _refused(ended=6.0)
    elif change == "a slow single refusal":
        probes[1] = _refused(1.2, 3.0)
    elif change == "a refusal not counted":
        counted = 5
    result = ScenarioResult("overload", {})
    reliability_overload._judge_round(result, served + refused, probes, settings, "burst", counted)
    assert _failed(result, "burst") == failed


def test_fault_verdicts_fail_when_more_fail_than_the_fault_reaches_or_the_exception_shows():
    solo = {i: _ok(f"answer {i}") for i in range(3)}
    error = {"error": {"message": "internal server error (request id 1)", "code": "internal_error"}}
    one_failed = [replace(_ok(), error_event=error, done=False), _ok("answer 1"), _ok("answer 2")]
    result = ScenarioResult("faults", {})
    reliability_faults._judge_contained(result, "one request", one_failed, solo, most_failed=1)
    assert result.passed, result.checks
    leaked = {"error": {"message": "InjectedFault: injected fault at 'output'"}}
    broken = [replace(_ok(), error_event=error), replace(_ok(), error_event=leaked), _ok("answer 1!")]
    result = ScenarioResult("faults", {})
    reliability_faults._judge_contained(result, "one request", broken, solo, most_failed=1)
    assert _failed(result, "one request") == {"1 to 1 streams end with an error event",
                                              "every other stream equals its solo text",
                                              "no internal text in what clients saw"}


def test_proxy_verdicts_fail_on_a_late_error_event_and_on_a_hung_stream():
    settings = reliability_proxy.ProxyFailoverSettings(error_bound_s=5.0)
    solo = {0: _ok()}
    disconnected = {"error": {"code": "node_disconnected"}}
    kill = {"at": 10.0, "in_flight": 2, "completed_before": 3}
    broken_at_once = replace(_ok(), error_event=disconnected, done=False, ended_s=10.5)
    result = ScenarioResult("proxy", {})
    reliability_proxy._judge_load(result, [broken_at_once, _ok()], [0, 0], solo, kill, settings)
    assert result.passed, result.checks
    late = replace(broken_at_once, ended_s=16.0)
    hung = StreamRecord(status=200, text="the", transport_error="timed out (ReadTimeout)")
    result = ScenarioResult("proxy", {})
    reliability_proxy._judge_load(result, [late, hung], [0, 0], solo, kill, settings)
    assert _failed(result) == {"streams running on B end at once with node_disconnected",
                               "every other request completes with its solo text (no 5xx, no hang)"}
    result = ScenarioResult("proxy", {})
    reliability_proxy._judge_load(result, [_ok()], [0], solo, {}, settings)
    assert "node B was killed while streams ran on it" in _failed(result)


def test_a_scenario_without_checks_or_that_stopped_does_not_pass():
    assert not ScenarioResult("x", {}).passed
    stopped = ScenarioResult("x", {}, error="RuntimeError: the server did not start")
    stopped.check("something", True, "")
    assert not stopped.passed and "could not run to its end" in report([stopped])


def test_the_corpus_is_well_formed_and_the_mutants_are_seeded():
    cases = corpus()
    assert len({c.name for c in cases}) == len(cases) >= 60
    assert all(len(c.content or b"") <= 2 * MAX_REQUEST_BYTES for c in cases)
    first, again = list(mutants(30, seed=1)), list(mutants(30, seed=1))
    assert [(m.body, m.content) for m in first] == [(m.body, m.content) for m in again]
    assert rss_bytes(os.getpid()) > 0


# ---------------------------------------------------------------------- the scenarios (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in SCENARIOS if name != "soak"])
def test_scenario_holds_at_ci_scale(name, tmp_path):
    result = run_scenario(name, "ci", tmp_path)
    assert result.passed, report([result])


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    return run_scenario("soak", "ci", tmp_path_factory.mktemp("soak"))


@pytest.mark.slow
def test_soak_holds_at_ci_scale(soak):
    assert soak.error is None and [c.name for c in soak.checks if not c.passed] == [], report([soak])


@pytest.mark.slow
def test_the_soak_catches_a_server_that_gets_texts_wrong_fails_requests_and_leaks_kv(tmp_path):
    settings = replace(reliability_soak.SCALES["ci"], requests=32, concurrency=8, prompts=4, idle_timeout_s=3)
    sabotage = {"PYTHONPATH": SABOTAGE_DIR, "TIDEMIND_SABOTAGE": "wrong-text,server-error,kv-leak"}
    result = run_scenario("soak", "ci", tmp_path, env=sabotage, settings=settings)
    assert result.error is None, result.error
    assert _failed(result) >= {"survivors equal their solo greedy text", "no 5xx, no error event, no refusal",
                               "KV back to full after the warm-up", "KV back to full after the main phase"}, \
        report([result])


@pytest.mark.slow
def test_the_overload_catches_a_server_that_leaks_a_slot(tmp_path):
    settings = replace(reliability_overload.SCALES["ci"], requests=24, limit=4, rounds=2, max_tokens=32, probes=2,
                       idle_timeout_s=3)
    sabotage = {"PYTHONPATH": SABOTAGE_DIR, "TIDEMIND_SABOTAGE": "slot-leak"}
    result = run_scenario("overload", "ci", tmp_path, env=sabotage, settings=settings)
    assert result.error is None, result.error
    assert _failed(result, "round") == {"afterwards no slot held and every KV block free",
                                        "exactly the limit answered, the rest 429"}, report([result])
