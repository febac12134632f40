"""pipeline(): the offline Python entry point."""
from __future__ import annotations

import logging
import queue
import random
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Union

from .chat.grammar import check_response_format
from .chat.templates import ChatTemplateConfig, get_chat_template
from .config import EngineConfig, GenerationConfig
from .config_compat import engine_config_from_kwargs
from .engine.async_engine import AsyncEngine, EngineFront
from .engine.engine import Engine
from .messages import RequestOutput, Response

logger = logging.getLogger("tidemind")

Messages = List[Dict]  # OpenAI-style [{"role": ..., "content": ...}, ...]
Prompt = Union[str, Messages]


def _is_messages(obj) -> bool:
    return isinstance(obj, list) and len(obj) > 0 and all(isinstance(m, dict) for m in obj)


def _split_prompts(prompts) -> tuple:
    """(list of prompts, whether a single prompt was given)."""
    if isinstance(prompts, str) or _is_messages(prompts):
        return [prompts], True
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) or _is_messages(p) for p in prompts):
        return list(prompts), False
    raise ValueError("prompts must be a str, an OpenAI message list ([{'role': 'user', 'content': ...}]), "
                     "or a non-empty list of those")


def _turn_messages(prompt: Prompt) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@dataclass
class Session:
    """A multi-turn conversation kept by Pipeline.chat()."""

    session_id: int
    history: List[Dict] = field(default_factory=list)  # alternating user / assistant messages
    response: Optional[Response] = None



class Pipeline:
    def __init__(self, model_path: Optional[str] = None, backend_config: Optional[EngineConfig] = None,
                 chat_template_config: Optional[ChatTemplateConfig] = None, chat_template: Optional[str] = None,
                 engine_process: bool = False):
        """engine_process: run the engine in a process of its own (engine/engine_client.py); then
        `engine` is a RemoteEngine (the engine's model, limits and stats, not its internals)."""
        if engine_process:
            from .engine.engine_client import EngineProcessClient

            self._async: Optional[EngineFront] = EngineProcessClient(model_path, backend_config or EngineConfig())
            self.engine = self._async.engine
        else:
            self.engine = Engine(model_path, backend_config or EngineConfig())
            self._async = AsyncEngine(self.engine)
        self.tokenizer = self.engine.tokenizer
        self.chat_template = get_chat_template(self.tokenizer, chat_template, chat_template_config)
        self._session_ids = iter(range(1, 1 << 62))

    @property
    def async_engine(self) -> EngineFront:
        """The engine's driver, for callers that submit token ids directly (benchmarks, the server)."""
        return self._async

    # ------------------------------------------------------------------ inputs
    def encode_prompt(self, prompt: Prompt) -> List[int]:
        return self.tokenizer.encode(self.chat_template.messages2prompt(prompt))

    def _gen_configs(self, gen_config, count: int) -> List[GenerationConfig]:
        if gen_config is None:
            return [GenerationConfig()] * count
        if isinstance(gen_config, GenerationConfig):
            return [gen_config] * count
        configs = list(gen_config)
        if len(configs) != count or not all(isinstance(c, GenerationConfig) for c in configs):
            raise ValueError(f"gen_config must be one GenerationConfig or a list of {count} (one per prompt)")
        return configs

    def with_template_stops(self, config: GenerationConfig) -> GenerationConfig:
        """Add the chat template's end-of-answer words: single-token ones as stop token ids (the
        sampler sees them at once), longer ones as stop words matched on the text. With ignore_eos
        the template's end words are ignored too (the user's own stop words still apply)."""
        if config.ignore_eos:
            return config
        token_ids, words = list(config.stop_token_ids or ()), list(config.stop_words or ())
        for word in self.chat_template.stop_words:
            ids = self.tokenizer.encode(word, add_bos=False)
            if len(ids) == 1:
                token_ids += [i for i in ids if i not in token_ids]
            elif word not in words:
                words.append(word)
        if (tuple(token_ids), tuple(words)) == (config.stop_token_ids or (), config.stop_words or ()):
            return config
        return config.replace(stop_token_ids=tuple(token_ids) or None, stop_words=tuple(words) or None)

    def _submit_all(self, prompts, gen_config, sink_for) -> List[List[int]]:
        """Submit every sample of every prompt; returns request ids per prompt (n per prompt)."""
        prompt_ids = [self.encode_prompt(p) for p in prompts]
        configs = [self.with_template_stops(c) for c in self._gen_configs(gen_config, len(prompts))]
        for ids, config in zip(prompt_ids, configs):  # validate everything before submitting anything
            self.engine.validate_request(ids, config)
            check_response_format(config.response_format)
        request_ids = []
        for index, (ids, config) in enumerate(zip(prompt_ids, configs)):
            base_seed = config.random_seed if config.random_seed is not None else random.getrandbits(31)
            request_ids.append([self._async.submit(ids, config, sink_for(index, sample), base_seed + sample)
                                for sample in range(config.n)])
        return request_ids

    # ------------------------------------------------------------------ calls
    def __call__(self, prompts, gen_config=None, use_tqdm: bool = False):
        """Answer a prompt (-> Response) or a list of prompts (-> list of Response).

        With gen_config.n > 1 each prompt's answer is a list of n Responses.
        """
        prompt_list, single = _split_prompts(prompts)
        events: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        request_ids = self._submit_all(prompt_list, gen_config,
                                       lambda index, sample: (lambda out: events.put((index, sample, out))))
        responses = {(i, s): self._new_response(i) for i, ids in enumerate(request_ids) for s in range(len(ids))}
        unfinished = {i: len(ids) for i, ids in enumerate(request_ids)}
        progress = _progress_bar(len(prompt_list)) if use_tqdm else None
        try:
            while any(unfinished.values()):
                index, sample, out = events.get()
                _accumulate(responses[index, sample], _delta(out, index))
                unfinished[index] -= out.finished
                if progress is not None and out.finished and not unfinished[index]:
                    progress.update(1)
        except BaseException:
            for rid in (rid for ids in request_ids for rid in ids):
                self._async.abort(rid)
            raise
        finally:
            if progress is not None:
                progress.close()
        results = [[responses[i, s] for s in range(len(ids))] for i, ids in enumerate(request_ids)]
        results = [r[0] if len(r) == 1 else r for r in results]
        return results[0] if single else results

    batch_infer = __call__

    def stream_infer(self, prompts, gen_config=None) -> Iterator[Response]:
        """Yield deltas as they are generated: each Response holds the new text and token ids of one
        request since its previous delta; `index` says which prompt it answers (samples of n > 1
        share their prompt's index), `finish_reason` is set on its last delta."""
        prompt_list, _ = _split_prompts(prompts)
        events: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        request_ids = self._submit_all(prompt_list, gen_config,
                                       lambda index, sample: (lambda out: events.put((index, out))))
        session_ids = {rid: next(self._session_ids) for ids in request_ids for rid in ids}
        remaining = len(session_ids)
        try:
            while remaining:
                index, out = events.get()
                remaining -= out.finished
                yield _delta(out, index, session_ids[out.request_id])
        finally:
            if remaining:
                for rid in session_ids:
                    self._async.abort(rid)

    def chat(self, prompt: Prompt, session: Optional[Session] = None, gen_config=None,
             stream_response: bool = False):
        """One turn of a multi-turn conversation; returns the Session (its .response holds the answer).

        The conversation's KV cache stays in the engine between turns, so a turn computes only its
        own tokens; end_session() frees it. With stream_response=True, returns an iterator of
        Response deltas and updates the session when the answer is complete.
        """
        session = session or self.new_session()
        config = self.with_template_stops(self._gen_configs(gen_config, 1)[0])
        if config.n != 1:
            raise ValueError("chat() keeps one conversation: use gen_config.n == 1")
        check_response_format(config.response_format)
        turn = _turn_messages(prompt)
        first_turn = not session.history
        # Later turns render only the new messages: the conversation so far is in the engine's session.
        text = self.chat_template.messages2prompt(turn, sequence_start=first_turn)
        turn_ids = self.tokenizer.encode(text, add_bos=first_turn)
        outputs = self._async.stream(turn_ids, config, session_id=session.session_id)  # validates now
        stream = self._chat_turn(session, session.history + turn, outputs)
        if stream_response:
            return stream
        for _ in stream:
            pass
        return session

    def _chat_turn(self, session: Session, messages: Messages, outputs) -> Iterator[Response]:
        full = self._new_response(0)
        full.session_id = session.session_id
        try:
            for out in outputs:
                delta = _delta(out, 0, session.session_id)
                _accumulate(full, delta)
                yield delta
        finally:
            outputs.close()  # an abandoned turn is aborted now, not when garbage-collected
        if full.finish_reason in ("stop", "length"):
            session.history = messages + [{"role": "assistant", "content": full.text}]
        session.response = full

    def new_session(self) -> Session:
        return Session(session_id=next(self._session_ids))

    def end_session(self, session: Session) -> None:
        """Free the conversation's KV cache in the engine; the Session object can start afresh."""
        self._async.end_session(session.session_id)
        session.history = []

    def _new_response(self, index: int) -> Response:
        return Response(text="", generate_token_len=0, input_token_len=0, session_id=next(self._session_ids),
                        index=index)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self._async is not None:
            self._async.close()
            self._async = None

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _delta(out: RequestOutput, index: int, session_id: int = 0) -> Response:
    """One engine output as a Response holding only what is new."""
    if out.error:
        logger.error("request failed: %s", out.error)
    return Response(text=out.new_text, generate_token_len=out.num_generated_tokens,
                    input_token_len=out.num_prompt_tokens, session_id=session_id, finish_reason=out.finish_reason,
                    token_ids=list(out.new_token_ids), logprobs=out.new_logprobs, index=index,
                    prompt_logprobs=out.prompt_logprobs)


def _accumulate(full: Response, delta: Response) -> None:
    full.text += delta.text
    full.token_ids.extend(delta.token_ids)
    full.generate_token_len = delta.generate_token_len
    full.input_token_len = delta.input_token_len
    full.finish_reason = delta.finish_reason
    if delta.logprobs:
        full.logprobs = (full.logprobs or []) + list(delta.logprobs)
    if delta.prompt_logprobs is not None:
        full.prompt_logprobs = delta.prompt_logprobs


def _progress_bar(total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="prompts", unit="prompt")


def _configure_logging(level: str) -> None:
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s tidemind: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)


def pipeline(model_path: Optional[str] = None, backend_config: Optional[EngineConfig] = None,
             chat_template_config: Optional[ChatTemplateConfig] = None, log_level: str = "WARNING",
             chat_template: Optional[str] = None, model_name: Optional[str] = None,
             max_log_len: Optional[int] = None, speculative_config=None, engine_process: bool = False,
             **kwargs) -> Pipeline:
    """Load a model (a directory, a .gguf file, a bundled model name; None: the bundled default)
    and return a Pipeline that answers prompts.

    LMDeploy's signatures are taken as written: extra keyword arguments are EngineConfig fields or
    LMDeploy engine arguments (tp=1, block_size=64, download_dir=...); ``model_name`` (LMDeploy 0.3,
    also its second positional argument) picks the chat template when it names a built-in one;
    ``max_log_len`` has no effect (prompts are never logged). ``engine_process=True`` runs the engine
    in a process of its own (what the api_server does on a GPU)."""
    _configure_logging(log_level)
    if isinstance(backend_config, str):  # LMDeploy 0.3: pipeline(model_path, model_name, ...)
        model_name, backend_config = backend_config, None
    if speculative_config is not None:
        raise ValueError("speculative_config: speculative decoding is not implemented in tidemind; leave it out")
    if kwargs:
        if backend_config is not None:
            raise ValueError(f"pass engine settings either in backend_config or as keywords, not both: {sorted(kwargs)}")
        backend_config = engine_config_from_kwargs(kwargs)
    model_name = model_name or getattr(backend_config, "lmdeploy_model_name", None)
    if model_name:
        chat_template = _template_from_model_name(model_name, chat_template, chat_template_config)
    return Pipeline(model_path, backend_config, chat_template_config, chat_template, engine_process=engine_process)


def _template_from_model_name(model_name: str, chat_template: Optional[str],
                              chat_template_config: Optional[ChatTemplateConfig]) -> Optional[str]:
    """LMDeploy 0.3 chose the chat template by model_name: do the same when it names a built-in
    template and no template was chosen otherwise."""
    from .chat.templates import list_templates

    if chat_template is None and chat_template_config is None and model_name.lower() in list_templates():
        logger.info("model_name=%r: using the built-in %r chat template", model_name, model_name.lower())
        return model_name.lower()
    logger.warning("model_name=%r does not pick the chat template here (%s): the model's own template is used; "
                   "pass chat_template=NAME to choose one", model_name,
                   "one was chosen explicitly" if chat_template or chat_template_config else "not a built-in name")
    return chat_template
