"""`tidemind serve api_client URL`: chat in the terminal with a running api_server.

Turns go through the server's stateful `POST /v1/chat/interactive` with interactive_mode=true, so
the server keeps the conversation and its KV cache; `end` ends that session, Ctrl-C during an
answer cancels the turn (cancel=true). httpx is imported inside functions (light `--help`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import secrets
import sys
import time
from typing import Dict, Iterator, Optional

from ..config import GenerationConfig
from .chat_loop import END_WORD, EXIT_WORD, ChatTurnError, run_chat_loop

logger = logging.getLogger("tidemind")

INTERACTIVE_PATH = "/v1/chat/interactive"
DEFAULT_URL_EXAMPLE = "http://127.0.0.1:23333"
# GenerationConfig fields the interactive endpoint takes (it refuses unknown fields).
CLIENT_GEN_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                     "random_seed", "stop_words")


class ServerError(RuntimeError):
    """The server cannot be used at all (down, wrong URL, wrong key): the message names the fix."""


class TurnRejected(ChatTurnError):
    """The server refused to start a turn (HTTP `status`); the conversation is unchanged."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def new_session_id() -> int:
    # Random, so that clients sharing a server do not continue each other's conversations.
    return 1 + secrets.randbelow(2**31 - 1)


def check_url(url: str) -> str:
    """The server's base URL: HOST:PORT as LMDeploy takes it (http:// is assumed), or a full URL;
    a trailing /v1 is dropped."""
    from urllib.parse import urlsplit

    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    try:
        parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or " " in url:
        raise ServerError(f"{url!r} is not a server address: give the api_server's HOST:PORT or base URL, e.g. "
                          f"127.0.0.1:23333 or {DEFAULT_URL_EXAMPLE}")
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def sampling_body(gen_config: GenerationConfig) -> Dict:
    """GenerationConfig as the interactive endpoint's fields; greedy is temperature 0."""
    body = {"max_tokens": gen_config.max_new_tokens,
            "temperature": gen_config.temperature if gen_config.do_sample else 0.0,
            "top_p": gen_config.top_p, "top_k": gen_config.top_k,
            "repetition_penalty": gen_config.repetition_penalty}
    if gen_config.random_seed is not None:
        body["seed"] = gen_config.random_seed
    if gen_config.stop_words:
        body["stop"] = list(gen_config.stop_words)
    return body


def _error_message(response) -> str:
    """The server's own words from an error response (OpenAI- or LMDeploy-shaped), else its text."""
    try:
        payload = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if not isinstance(payload, dict):
        return str(payload)
    error = payload.get("error", payload)
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)
    return str(error)


class InteractiveClient:
    """Speaks to one api_server: its /v1/chat/interactive sessions and /v1/models."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = 10.0):
        import httpx

        self.url = check_url(url)
        self.api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout on answers: a long answer may take minutes; connecting must be quick.
        self._http = httpx.Client(base_url=self.url, headers=headers,
                                  timeout=httpx.Timeout(timeout, read=None))

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs):
        import httpx

        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc) -> ServerError:
        return ServerError(f"cannot reach an api_server at {self.url} ({type(exc).__name__}: {exc}): check the "
                           f"URL's host and port, and that `tidemind serve api_server` is running there")

    def _raise_for_server(self, response) -> None:
        """ServerError for answers that make the server unusable (auth, not an api_server)."""
        if response.status_code in (401, 403):
            fix = ("pass the server's key with --api-key" if not self.api_key
                   else "the key given with --api-key is not one of the server's keys")
            raise ServerError(f"the server at {self.url} refused the request ({response.status_code}: "
                              f"{_error_message(response)}): {fix}")
        if response.status_code in (404, 405):
            raise ServerError(f"{self.url} has no {response.request.url.path} endpoint: give the base URL of a "
                              f"`tidemind serve api_server` (e.g. {DEFAULT_URL_EXAMPLE}, without a path)")

    def model_names(self):
        """The served model names; also proves the URL and the key work."""
        response = self._request("GET", "/v1/models")
        self._raise_for_server(response)
        if response.status_code != 200:
            raise ServerError(f"{self.url}/v1/models answered {response.status_code}: {_error_message(response)}")
        try:
            return [m["id"] for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise ServerError(f"{self.url}/v1/models did not answer with an OpenAI model list: is it a "
                              f"`tidemind serve api_server`?") from None

    def stream_turn(self, session_id: int, prompt: str, gen_config: GenerationConfig) -> Iterator[Dict]:
        """Run one turn of a server-kept conversation; yields the server's stream objects
        ({"text": delta, "tokens", "input_tokens", "history_tokens", "finish_reason"}).
        Closing the iterator early drops the connection (then call cancel() to be sure)."""
        import httpx

        body = {"prompt": prompt, "session_id": session_id, "interactive_mode": True, "stream": True,
                **sampling_body(gen_config)}
        try:
            with self._http.stream("POST", INTERACTIVE_PATH, json=body) as response:
                if response.status_code != 200:
                    response.read()
                    self._raise_for_server(response)
                    raise TurnRejected(f"the server rejected the turn ({response.status_code}): "
                                       f"{_error_message(response)}", response.status_code)
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    try:
                        chunk = json.loads(line)
                    except ValueError:
                        raise ServerError(f"{self.url}{INTERACTIVE_PATH} sent a line that is not JSON: "
                                          f"{line[:200]!r}: is it a `tidemind serve api_server`?") from None
                    if chunk.get("error") or chunk.get("finish_reason") == "error":
                        raise ChatTurnError(f"the server could not finish the turn: "
                                            f"{chunk.get('error') or 'its log says why'}")
                    yield chunk
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    def _post_control(self, body: Dict) -> None:
        response = self._request("POST", INTERACTIVE_PATH, json={"stream": False, **body})
        self._raise_for_server(response)
        if response.status_code != 200:
            raise ChatTurnError(f"the server refused {body}: {_error_message(response)}")

    def cancel(self, session_id: int) -> None:
        """Abort the session's running turn; the conversation stays as it was before that turn."""
        self._post_control({"prompt": "", "session_id": session_id, "cancel": True, "interactive_mode": True})

    def end_session(self, session_id: int) -> None:
        """Forget the conversation and free its KV on the server."""
        self._post_control({"prompt": "", "session_id": session_id, "interactive_mode": False})


class RemoteConversation:
    """A Conversation kept by an api_server under one session id."""

    # After a cancel the server may still see the aborted turn running for a moment and refuse the
    # next one as busy; it is retried for this long.
    BUSY_RETRY_S = 3.0

    def __init__(self, client: InteractiveClient, session_id: Optional[int] = None):
        self.client = client
        self.session_id = session_id if session_id is not None else new_session_id()
        self.started = False  # the server may hold a session under session_id
        self._cancelled_at = float("-inf")

    def send(self, prompt: str, gen_config: GenerationConfig) -> Iterator[str]:
        self.started = True
        first, chunks = self._start_turn(prompt, gen_config)
        try:
            for chunk in itertools.chain(first, chunks):
                if chunk.get("text"):
                    yield chunk["text"]
                if chunk.get("finish_reason"):
                    logger.info("session %d: %s tokens generated, %s prompt tokens of which %s reused from the "
                                "session (finish_reason=%s)", self.session_id, chunk.get("tokens"),
                                chunk.get("input_tokens"), chunk.get("history_tokens"), chunk["finish_reason"])
        finally:
            chunks.close()  # drops the connection if the turn did not finish

    def _start_turn(self, prompt: str, gen_config: GenerationConfig):
        """([first stream object] or [], the rest of the stream)."""
        while True:
            chunks = self.client.stream_turn(self.session_id, prompt, gen_config)
            try:
                return [next(chunks)], chunks
            except StopIteration:
                return [], chunks
            except TurnRejected as exc:
                if "busy" not in str(exc) or time.monotonic() - self._cancelled_at > self.BUSY_RETRY_S:
                    raise
                logger.debug("session %d still busy with the cancelled turn: retrying", self.session_id)
                time.sleep(0.05)

    def cancel(self) -> None:
        self._cancelled_at = time.monotonic()
        self.client.cancel(self.session_id)

    def reset(self) -> None:
        if self.started:
            self.client.end_session(self.session_id)
            self.started = False

    def close(self) -> None:
        self.reset()


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config_flags import add_config_flags

    parser.description = (f"Chat with a running `tidemind serve api_server`; the server keeps the "
                          f"conversation. Type '{END_WORD}' to start a new conversation, '{EXIT_WORD}' to quit, "
                          f"Ctrl-C to stop an answer. With a pipe on stdin, each line gets one answer line. "
                          f"Answers are greedy unless --do-sample; --log-level INFO logs each turn's token "
                          f"counts (how many prompt tokens the server reused from the session).")
    parser.add_argument("api_server_url", metavar="URL",
                        help=f"the api_server's HOST:PORT or base URL, e.g. 127.0.0.1:23333 or {DEFAULT_URL_EXAMPLE}")
    parser.add_argument("--api-key", default=None,
                        help="a key the server accepts (sent as 'Authorization: Bearer KEY')")
    parser.add_argument("--session-id", type=int, default=None,
                        help="the server-side session to use (default: a random one); the session is "
                             "ended on 'end' and on exit")
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    exclude = [f for f in GenerationConfig.__dataclass_fields__ if f not in CLIENT_GEN_FIELDS]
    add_config_flags(parser, GenerationConfig, "generation", exclude=exclude)


def run(args: argparse.Namespace) -> int:
    from ..config_flags import config_from_args

    interactive = sys.stdin.isatty()
    if args.log_level != "DEBUG":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    gen_config = config_from_args(GenerationConfig, args)
    client = InteractiveClient(args.api_server_url, args.api_key)
    try:
        names = client.model_names()  # fail before the first prompt if the URL or key is wrong
        conversation = RemoteConversation(client, args.session_id)
        if interactive:
            print(f"connected to {client.url} ({', '.join(names) or 'no model'}), session "
                  f"{conversation.session_id}. Type '{END_WORD}' for a new conversation, "
                  f"'{EXIT_WORD}' to quit, Ctrl-C to stop an answer.", file=sys.stderr)
        return run_chat_loop(conversation, gen_config, interactive)
    finally:
        client.close()
