"""`tidemind serve gradio` in headless Chromium (Playwright), with no network beyond loopback.

Every request the page makes to anything but the page's own server is recorded and refused: the
page must load and work without them (no fonts, scripts or telemetry from the internet).
Chromium is the system one (/usr/bin/chromium); nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from typing import Callable, List, Optional

import httpx
import pytest

from serve_fixtures import api_server, free_port, running

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = os.path.join(os.path.dirname(__file__), "artifacts", "gradio_chat.png")

needs_browser = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                   reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class ChatPage:
    """One browser session on the page; `external` lists requests that tried to leave loopback."""

    def __init__(self, browser, url: str):
        self.external: List[str] = []
        self.context = browser.new_context(viewport={"width": 1280, "height": 820})
        self.context.route("**/*", self._only_loopback)
        self.page = self.context.new_page()
        self.page.goto(url)
        self.page.wait_for_selector("#prompt textarea", timeout=30_000)

    def _only_loopback(self, route) -> None:
        if re.match(r"^(https?|wss?)://127\.0\.0\.1[:/]|^(data|blob):", route.request.url):
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def set_control(self, elem_id: str, value) -> None:
        box = self.page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Enter")

    def ask(self, text: str) -> None:
        self.page.fill("#prompt textarea", text)
        self.page.click("#send")

    def messages(self, role: str) -> List[str]:
        return self.page.locator(f'#chatbot [data-testid="{role}"]').all_inner_texts()

    def answer(self, index: int) -> str:
        answers = self.messages("bot")
        return answers[index] if index < len(answers) else ""

    def answered(self, index: int) -> bool:
        """Answer `index` is complete: its question is shown and Send is enabled again (the page
        disables Send, in the update that shows the question, until the answer ends)."""
        return len(self.messages("user")) > index and self.page.locator("#send").is_enabled()

    def follow_answer(self, index: int, until: Optional[Callable[[str], bool]] = None,
                      timeout: float = 120) -> List[str]:
        """The distinct texts of answer `index` (0: the first), polled until `until(text)` holds or,
        without `until`, until the answer is complete."""
        seen, deadline = [""], time.time() + timeout
        while not (until(seen[-1]) if until else self.answered(index)):
            assert time.time() < deadline, f"timed out waiting for answer {index}; it reads {seen[-1]!r}"
            time.sleep(0.05)
            text = self.answer(index)
            if text != seen[-1]:
                seen.append(text)
        text = self.answer(index)
        return [t for t in seen if t] + ([text] if text != seen[-1] else [])


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def gradio_page(log_path: str, *args: str):
    port = free_port()
    command = ["serve", "gradio", *args, "--server-name", "127.0.0.1", "--server-port", str(port)]
    with running(command, port, log_path) as url:
        yield url


def metric(url: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(f"{url}/metrics", timeout=10).text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


@pytest.mark.slow
@needs_browser
def test_page_streams_stops_and_resets_on_its_own_engine(browser, tmp_path):
    with gradio_page(str(tmp_path / "gradio.log"), "--device", "cpu", "--dtype", "float32") as url:
        chat = ChatPage(browser, url)
        chat.set_control("temperature", 0)
        chat.set_control("max_new_tokens", 64)
        question = "Tell me three facts about Paris."
        chat.ask(question)
        texts = chat.follow_answer(0)
        assert chat.messages("user") == [question] and "Paris" in texts[-1]
        # Streamed: the answer was seen growing. (Not strictly a prefix each time: markdown renders a
        # partial text differently, e.g. "1." becomes a list item.)
        assert len(texts) >= 3 and len(texts[0]) < len(texts[-1]) / 2, texts
        assert chat.page.input_value("#prompt textarea") == ""

        chat.set_control("max_new_tokens", 400)
        chat.ask("Write a very long story about a dragon and a knight, with many chapters.")
        typed_at = len(chat.follow_answer(1, until=lambda t: len(t.split()) >= 10, timeout=60)[-1])
        chat.page.fill("#prompt textarea", "Say hello.")  # the next question, typed while it streams
        chat.follow_answer(1, until=lambda t: len(t) > typed_at + 20, timeout=60)
        chat.page.click("#stop")
        stopped = chat.follow_answer(1, timeout=30)[-1]
        assert stopped.endswith("(stopped)") and len(stopped.split()) < 300, stopped
        assert chat.page.input_value("#prompt textarea") == "Say hello."
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        chat.page.screenshot(path=SCREENSHOT, full_page=True)

        # The conversation goes on after a stop.
        chat.set_control("max_new_tokens", 32)
        chat.page.click("#send")
        chat.follow_answer(2)
        assert len(chat.messages("user")) == len(chat.messages("bot")) == 3

        chat.page.click("#reset")
        wait_for(lambda: not chat.messages("bot") and not chat.messages("user"), 20, "the chat to clear")
        assert chat.external == [], chat.external


@pytest.mark.slow
@needs_browser
def test_page_in_front_of_an_api_server_keeps_one_session_per_browser(browser, tmp_path):
    with api_server("--api-keys", "page-key", log_path=str(tmp_path / "api_server.log")) as server, \
            gradio_page(str(tmp_path / "gradio.log"), server, "--api-key", "page-key") as url:
        first, second = ChatPage(browser, url), ChatPage(browser, url)
        for chat in (first, second):
            chat.set_control("temperature", 0)
            chat.set_control("max_new_tokens", 24)
        first.ask("My name is Ada. Say hi.")
        second.ask("Name a color.")
        for chat in (first, second):
            chat.follow_answer(0)
        assert first.messages("user") == ["My name is Ada. Say hi."]
        assert second.messages("user") == ["Name a color."]
        assert metric(server, "tidemind_num_sessions") == 2  # each browser has its own conversation

        cached_before = metric(server, "tidemind_cached_prompt_tokens_total")
        first.ask("What is my name?")
        first.follow_answer(1)
        assert metric(server, "tidemind_cached_prompt_tokens_total") > cached_before  # the session's KV

        first.page.click("#reset")
        wait_for(lambda: not first.messages("bot"), 20, "the chat to clear")
        wait_for(lambda: metric(server, "tidemind_num_sessions") == 1, 10, "the server to end the session")
        assert len(second.messages("bot")) == 1
        assert first.external == [] and second.external == []


@pytest.mark.parametrize("args, expected", [
    (["http://127.0.0.1:9", "--session-len", "512"], "--session-len set up an in-process engine"),
    (["--api-key", "k"], "--api-key is for a server URL"),
    (["http://127.0.0.1:{port}"], "cannot reach an api_server"),
])
def test_command_line_mistakes_name_the_fix(args, expected):
    args = [a.format(port=free_port()) for a in args]
    result = subprocess.run([sys.executable, "-m", "tidemind.cli.main", "serve", "gradio", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_port_in_use_is_refused_before_the_model_loads():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "tidemind.cli.main", "serve", "gradio", "--server-name",
                                 "127.0.0.1", "--server-port", str(port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "pick a free port with --server-port" in result.stderr, result.stderr
    assert "loading" not in result.stderr
