"""Bad input: a corpus of malformed and hostile requests, each with the status it must get, then
(scaled) random mutations of valid bodies, against an api_server with API keys, a small session
and a 1 MiB body limit.

Checks: every corpus case gets its expected status, and the server's own 4xx answers have OpenAI's
error body; no request of either kind gets a 5xx or goes unanswered; after every corpus case, and
after every 10 mutants, the server answers a normal request; at the end nothing is in flight and
every KV block is free.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import httpx

from .local_servers import local_api_server
from .reliability_cases import AUTH, KEY, MAX_REQUEST_BYTES, SESSION_LEN, Case, corpus, mutants
from .reliability_common import ScenarioResult, answers_normally, kv_figures, progress_bar, wait_idle

# Statuses a mutant may get: an answer, or a refusal of the client's request.
MUTANT_STATUSES = {200, 400, 401, 404, 405, 413}


@dataclass(frozen=True)
class CorpusSettings:
    mutants: int = 40
    seed: int = 0


SCALES = {"ci": CorpusSettings(), "full": CorpusSettings(mutants=1000)}


def _send(url: str, case: Case, timeout: float = 60.0) -> Optional[httpx.Response]:
    """The answer to one case (None for cases answered below HTTP, by `case.send`)."""
    if case.send is not None:
        return case.send(url)
    content = case.content if case.content is not None else (json.dumps(case.body).encode()
                                                              if case.body is not None else None)
    headers = {**({"Content-Type": "application/json"} if content is not None else {}), **case.headers}
    return httpx.request(case.method, f"{url}{case.path}", content=content, headers=headers, timeout=timeout,
                         trust_env=False)


def _status(answer) -> Optional[int]:
    return answer if isinstance(answer, int) or answer is None else answer.status_code


def _openai_error_body(response: httpx.Response) -> bool:
    try:
        error = response.json()["error"]
        return set(error) == {"message", "type", "param", "code"} and bool(error["message"])
    except (ValueError, KeyError, TypeError):
        return False


def _run_corpus(url: str, result: ScenarioResult, progress: bool) -> Dict[str, dict]:
    rows: Dict[str, dict] = {}
    wrong, bad_bodies, broke = [], [], []
    cases = corpus()
    with progress_bar(len(cases), "bad-input corpus", progress) as bar:
        for case in cases:
            started = time.monotonic()
            answer = _send(url, case)
            status = _status(answer)
            seconds = round(time.monotonic() - started, 3)
            rows[case.name] = {"expected": case.expect, "status": status, "seconds": seconds}
            if status != case.expect:
                wrong.append(f"{case.name}: {status} (expected {case.expect}) {getattr(answer, 'text', '')[:150]}")
            elif status is not None and status >= 400 and case.openai_body and not _openai_error_body(answer):
                bad_bodies.append(f"{case.name}: {answer.text[:150]}")
            ok, after = answers_normally(url, AUTH)
            if not ok:
                broke.append(f"after {case.name}: {after}")
            bar.update(1)
    result.check("every corpus case got its expected status", not wrong,
                 f"{len(cases) - len(wrong)}/{len(cases)}" + (f"; {'; '.join(wrong[:5])}" if wrong else ""))
    checked = sum(c.openai_body and c.expect is not None and c.expect >= 400 for c in cases)
    result.check("the server's 4xx answers have OpenAI's error body", not bad_bodies,
                 "; ".join(bad_bodies[:5]) or f"{checked} checked")
    result.check("a normal request is answered after every corpus case", not broke, "; ".join(broke[:3]) or
                 f"{len(cases)} times")
    return rows


def _run_mutants(url: str, settings: CorpusSettings, result: ScenarioResult, progress: bool) -> Dict[str, int]:
    statuses: Dict[str, int] = {}
    unexpected: List[str] = []
    broke: List[str] = []
    with progress_bar(settings.mutants, "mutants", progress) as bar:
        for i, case in enumerate(mutants(settings.mutants, settings.seed)):
            try:
                status = _status(_send(url, case))
            except httpx.HTTPError as exc:
                status, case = None, Case(f"{case.name} ({type(exc).__name__})", 0, body=case.body,
                                          content=case.content, path=case.path)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status not in MUTANT_STATUSES:
                sent = case.content if case.content is not None else json.dumps(case.body).encode()
                unexpected.append(f"{status} for {case.path} {sent[:200]!r}")
            if i % 10 == 9:
                ok, after = answers_normally(url, AUTH)
                if not ok:
                    broke.append(f"after mutant {i}: {after}")
            bar.update(1)
    result.check("no mutant got a 5xx or went unanswered", not unexpected,
                 f"statuses {statuses}" + (f"; {'; '.join(unexpected[:3])}" if unexpected else ""))
    result.check("a normal request is answered after every 10 mutants", not broke, "; ".join(broke[:3]) or "yes")
    return statuses


def run(settings: CorpusSettings, workdir: Path, progress: bool = False, env: Optional[dict] = None) -> ScenarioResult:
    result = ScenarioResult("bad input", asdict(settings))
    with local_api_server("--session-len", str(SESSION_LEN), "--api-keys", KEY, "--max-request-bytes",
                          str(MAX_REQUEST_BYTES), log_path=workdir / "corpus-server.log", env=env) as server:
        rows = _run_corpus(server.url, result, progress)
        statuses = _run_mutants(server.url, settings, result, progress)
        idle, m, waited = wait_idle(server.url)
        result.check("at the end nothing in flight and every KV block free", idle,
                     f"{kv_figures(m)} {waited:.2f} s after the last response")
    result.figures = {"corpus_cases": len(rows), "mutants": settings.mutants, "mutant_statuses": statuses,
                      "slowest_case_s": max(r["seconds"] for r in rows.values()), "cases": rows}
    return result


