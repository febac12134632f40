"""Frozen, documented configuration objects shared by the API, the CLI, the engine and the server.

Every field is documented where it is declared (``metadata["help"]``); the CLI builds its flags
from these declarations, so a field added here shows up in ``--help`` without further work.
Validation happens in ``__post_init__`` and raises ``ValueError`` naming the field and the fix.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

logger = logging.getLogger("tidemind")

DTYPES = ("auto", "float16", "bfloat16", "float32")
DEVICES = ("auto", "cuda", "cpu")
ATTENTION_BACKENDS = ("auto", "reference", "triton", "cpu")
# hf: a dense checkpoint; the others: the quant_method its config.json must record
MODEL_FORMATS = ("hf", "awq", "gptq", "smooth_quant")
QUANT_POLICIES = (0, 4, 8)  # KV cache: none, int4, int8 (LMDeploy's values)
EXECUTOR_BACKENDS = ("mp", "ray")  # how tensor-parallel ranks run: processes here, or Ray actors


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine loads a model and lays out its KV cache. Field names follow LMDeploy's."""

    dtype: str = field(default="auto", metadata=_help(
        "Weight and activation dtype: auto (bfloat16 on a GPU unless the checkpoint says float16, "
        "float32 on the CPU), float16, bfloat16 or float32.", choices=DTYPES))
    device: str = field(default="auto", metadata=_help(
        "Where the model runs: auto (cuda when a GPU is visible, else cpu), cuda or cpu.", choices=DEVICES))
    tp: int = field(default=1, metadata=_help(
        "Tensor-parallel size: the devices (GPUs, or CPU worker processes) one model is split over, one "
        "rank each; the model's attention heads (and intermediate size) must divide by it. Collectives "
        "run over NCCL on GPUs and gloo on the CPU."))
    distributed_executor_backend: Optional[str] = field(default=None, metadata=_help(
        "How tensor-parallel ranks run: mp (one worker process per rank on this machine; the default "
        "when tp > 1) or ray (one Ray actor per rank, placed over a Ray cluster's nodes: pip install "
        "'tidemind[ray]'). Unset at tp 1: the model runs in the engine's own process.",
        choices=EXECUTOR_BACKENDS))
    distributed_timeout: float = field(default=300.0, metadata=_help(
        "Seconds the engine waits for the tensor-parallel ranks to finish a step before it declares a "
        "rank hung, stops every rank and fails every request (the api_server then exits). Start-up phases "
        "(loading, sizing the KV cache, capturing graphs) may take max(this, 900) seconds; a rank that "
        "dies is noticed at once."))
    dist_init_addr: Optional[str] = field(default=None, metadata=_help(
        "HOST:PORT where tensor-parallel ranks meet (rank 0 listens there). Default: 127.0.0.1 and a "
        "free port (mp), or rank 0's node address and a free port there (ray)."))
    quant_policy: int = field(default=0, metadata=_help(
        "KV cache quantization as in LMDeploy: 0 (none), 8 (int8) or 4 (int4). Online, per token and "
        "head, asymmetric, no calibration: about 1.9x (int8) or 3.8x (int4) the KV tokens of a 16-bit "
        "cache in the same memory.", choices=QUANT_POLICIES))
    rope_scaling_factor: float = field(default=0.0, metadata=_help(
        "LMDeploy TurboMind's dynamic NTK RoPE scaling factor. Only 0 (the rope scaling of the model's "
        "config.json) is implemented yet."))
    session_len: Optional[int] = field(default=None, metadata=_help(
        "Most tokens (prompt + answer) one sequence may hold; default: the model's "
        "max_position_embeddings."))
    max_batch_size: Optional[int] = field(default=None, metadata=_help(
        "Most sequences in one engine step; default 256 on a GPU, 64 on the CPU."))
    cache_max_entry_count: float = field(default=0.8, metadata=_help(
        "Share of memory given to the KV cache: of the FREE GPU memory after the weights are "
        "loaded, or of the available RAM on the CPU (never more than max_batch_size sequences "
        "of session_len tokens can use)."))
    cache_block_seq_len: int = field(default=64, metadata=_help(
        "Tokens per KV cache block (the paging granularity)."))
    num_gpu_blocks: int = field(default=0, metadata=_help(
        "Explicit number of KV cache blocks on the device that runs the model (GPU or CPU); "
        "0 sizes the cache from cache_max_entry_count."))
    max_prefill_token_num: int = field(default=8192, metadata=_help(
        "Token budget of one engine step: prompt chunks and decode tokens together. Longer "
        "prompts are prefilled in chunks of at most this many tokens."))
    num_threads: int = field(default=0, metadata=_help(
        "CPU threads for torch on the CPU backend; 0 keeps torch's default."))
    attention_backend: str = field(default="auto", metadata=_help(
        "Attention and layer kernels: auto (triton on a GPU with Triton installed; cpu for a GGUF at "
        "stored precision on the CPU; else reference), reference (torch), triton, or cpu (C kernels, "
        "float32 cache).", choices=ATTENTION_BACKENDS))
    model_format: Optional[str] = field(default=None, metadata=_help(
        "What the checkpoint must be: hf (dense), awq, gptq or smooth_quant (W8A8). Default: whatever "
        "its config.json's quantization_config records (a checkpoint is never judged by its name).",
        choices=MODEL_FORMATS))
    eager_mode: bool = field(default=False, metadata=_help(
        "Run every step eagerly: no CUDA graphs for decode steps (they are captured at start-up on a "
        "GPU otherwise)."))
    overlap_schedule: Optional[bool] = field(default=None, metadata=_help(
        "Schedule and prepare each step while the device still runs the one before, and turn that "
        "step's tokens into outputs while the device runs the next: the host's work leaves the "
        "device's critical path (with tensor parallelism, step N+1 goes to the ranks before step N's "
        "answer is read). Default: on with a GPU, off on the CPU (nothing to overlap there) and with "
        "the Ray executor. Greedy outputs are the same either way; a request that stops on a token "
        "computes one token more, which no one sees."))
    enable_prefix_caching: bool = field(default=True, metadata=_help(
        "Reuse the KV of full cache blocks whose tokens, and all tokens before them, equal a "
        "request's: shared by reference, kept once free until their memory is needed. Greedy "
        "outputs are the same with it off; measured to cost nothing without sharing (BENCHMARKS.md)."))
    num_cpu_blocks: int = field(default=0, metadata=_help(
        "KV blocks in a host-memory swap pool (pinned on a GPU): a preempted request's KV is copied "
        "there and back instead of recomputed, and idle sessions' KV goes there before it would be "
        "dropped. 0 (and no swap_space): no swap, preemption recomputes."))
    swap_space: float = field(default=0.0, metadata=_help(
        "Size of the host swap pool in GiB, instead of num_cpu_blocks; 0: no swap."))

    def __post_init__(self):
        _check(self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        _check(self.device in DEVICES, f"device={self.device!r} is not one of {', '.join(DEVICES)}")
        _check_engine_capabilities(self)
        _check(self.session_len is None or self.session_len >= 1,
               f"session_len={self.session_len} must be a positive number of tokens")
        _check(self.max_batch_size is None or self.max_batch_size >= 1,
               f"max_batch_size={self.max_batch_size} must be >= 1")
        _check(0.0 < self.cache_max_entry_count <= 1.0,
               f"cache_max_entry_count={self.cache_max_entry_count} must be a share in (0, 1]")
        _check(self.cache_block_seq_len >= 1 and self.cache_block_seq_len & (self.cache_block_seq_len - 1) == 0,
               f"cache_block_seq_len={self.cache_block_seq_len} must be a power of two (16, 32, 64, ...)")
        _check(self.num_gpu_blocks >= 0, f"num_gpu_blocks={self.num_gpu_blocks} must be >= 0")
        _check(self.max_prefill_token_num >= 1,
               f"max_prefill_token_num={self.max_prefill_token_num} must be >= 1")
        _check(self.num_threads >= 0, f"num_threads={self.num_threads} must be >= 0")
        _check(self.model_format is None or self.model_format in MODEL_FORMATS,
               f"model_format={self.model_format!r} is not one of {', '.join(MODEL_FORMATS)}")
        _check(self.attention_backend in ATTENTION_BACKENDS,
               f"attention_backend={self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        _check(self.num_cpu_blocks >= 0, f"num_cpu_blocks={self.num_cpu_blocks} must be >= 0 (0: no swap)")
        _check(self.swap_space >= 0, f"swap_space={self.swap_space} must be >= 0 GiB (0: no swap)")
        _check(not (self.num_cpu_blocks and self.swap_space),
               f"num_cpu_blocks={self.num_cpu_blocks} and swap_space={self.swap_space} both size the host "
               f"swap pool: give only one of them")


def _check_engine_capabilities(config: EngineConfig) -> None:
    """Refuse, naming what is missing, the settings this build of tidemind cannot run (LMDeploy's
    tp, quant_policy and model_format take them; scripts written for it pass them)."""
    _check(isinstance(config.tp, int) and not isinstance(config.tp, bool) and config.tp >= 1,
           f"tp={config.tp!r} must be an integer >= 1")
    _check(config.distributed_executor_backend in (None,) + EXECUTOR_BACKENDS,
           f"distributed_executor_backend={config.distributed_executor_backend!r} is not one of "
           f"{', '.join(EXECUTOR_BACKENDS)} (mp: worker processes on this machine; ray: actors on a Ray cluster)")
    _check(config.distributed_timeout > 0, f"distributed_timeout={config.distributed_timeout} must be > 0 seconds")
    if config.dist_init_addr is not None:
        host, sep, port = config.dist_init_addr.rpartition(":")
        _check(bool(sep and host and port.isdigit() and int(port) <= 65535),
               f"dist_init_addr={config.dist_init_addr!r} is not HOST:PORT (e.g. 10.0.0.1:29500)")
    _check(config.quant_policy in QUANT_POLICIES,
           f"quant_policy={config.quant_policy!r} is not one of 0 (none), 4 (int4 KV cache), 8 (int8 KV cache)")
    _check(config.rope_scaling_factor == 0,
           f"rope_scaling_factor={config.rope_scaling_factor!r}: dynamic NTK RoPE scaling is not implemented in "
           f"tidemind (positions keep the frequencies config.json gives); to run past the trained context, use a "
           f"model whose config.json sets rope_scaling (linear, llama3 or yarn), which tidemind applies")


def _as_tuple(value, name: str, item_type) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    items = tuple(value)
    for item in items:
        _check(isinstance(item, item_type) and not isinstance(item, bool),
               f"{name} must be a list of {item_type.__name__}, got item {item!r}")
    return items


@dataclass(frozen=True)
class GenerationConfig:
    """How one request is decoded. Field names follow LMDeploy's; ``do_sample=False`` is greedy."""

    n: int = field(default=1, metadata=_help("Number of completions to generate for each prompt."))
    max_new_tokens: int = field(default=512, metadata=_help("Most tokens to generate."))
    do_sample: bool = field(default=False, metadata=_help(
        "Sample from the distribution; False (the default) picks the most likely token."))
    temperature: float = field(default=0.8, metadata=_help(
        "Softmax temperature when sampling; 0 means greedy."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling: keep the smallest set of tokens "
                                                     "whose probability adds up to top_p, in (0, 1]."))
    top_k: int = field(default=50, metadata=_help("Keep the k most likely tokens; 0 keeps all."))
    min_p: float = field(default=0.0, metadata=_help(
        "Drop tokens whose probability is below min_p times the top token's, in [0, 1]."))
    repetition_penalty: float = field(default=1.0, metadata=_help(
        "Divide positive (multiply negative) logits of tokens already in the prompt or output; 1 is off."))
    presence_penalty: float = field(default=0.0, metadata=_help(
        "Subtract this from logits of tokens that already appear in the output, in [-2, 2]."))
    frequency_penalty: float = field(default=0.0, metadata=_help(
        "Subtract this times the count of each token in the output, in [-2, 2]."))
    ignore_eos: bool = field(default=False, metadata=_help("Keep generating past end-of-sequence tokens."))
    random_seed: Optional[int] = field(default=None, metadata=_help(
        "Seed of this request's samples; the same seed gives the same text whatever else is batched."))
    stop_words: Optional[Tuple[str, ...]] = field(default=None, metadata=_help(
        "Strings that end generation when they appear in the text (also across token boundaries)."))
    include_stop_str_in_output: bool = field(default=False, metadata=_help(
        "Keep the matched stop string (or stop token text) in the output."))
    stop_token_ids: Optional[Tuple[int, ...]] = field(default=None, metadata=_help(
        "Token ids that end generation, besides the model's EOS ids."))
    bad_words: Optional[Tuple[str, ...]] = field(default=None, metadata=_help(
        "Words that must never be generated (each tokenized; its tokens are banned in sequence)."))
    bad_token_ids: Optional[Tuple[int, ...]] = field(default=None, metadata=_help(
        "Token ids that must never be generated."))
    min_new_tokens: Optional[int] = field(default=None, metadata=_help(
        "Generate at least this many tokens before EOS or a stop token may end the answer."))
    skip_special_tokens: bool = field(default=True, metadata=_help("Leave special tokens out of the text."))
    spaces_between_special_tokens: bool = field(default=True, metadata=_help(
        "LMDeploy's flag for slow tokenizers; tidemind's fast tokenizers decode the same either way."))
    logprobs: Optional[int] = field(default=None, metadata=_help(
        "Return the log-probabilities of the chosen token and this many top alternatives (0-20)."))
    prompt_logprobs: Optional[int] = field(default=None, metadata=_help(
        "Return the log-probability of every prompt token after the first, with this many top "
        "alternatives (0-20); Response.prompt_logprobs holds them."))
    response_format: Optional[dict] = field(default=None, metadata=_help(
        "Structured output, enforced while decoding: {'type': 'json_object'}, {'type': 'json_schema', "
        "'json_schema': {'schema': {...}}}, {'type': 'regex_schema', 'regex_schema': '...'} (LMDeploy's), "
        "{'type': 'choice', 'choice': [...]} or {'type': 'grammar', 'grammar': '<Lark or GBNF>'}."))
    logit_bias: Optional[Dict[int, float]] = field(default=None, metadata=_help(
        "Added to the logits of these token ids before sampling, each in [-100, 100] (OpenAI's "
        "logit_bias; -100 bans a token)."))

    def __post_init__(self):
        _check(isinstance(self.n, int) and self.n >= 1, f"n={self.n!r} must be an integer >= 1")
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
               f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 0")
        _check(self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        _check(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k={self.top_k!r} must be an integer >= 0 (0 keeps every token)")
        _check(0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1]")
        _check(self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty} must be > 0 (1 is off)")
        _check(-2 <= self.presence_penalty <= 2, f"presence_penalty={self.presence_penalty} must be in [-2, 2]")
        _check(-2 <= self.frequency_penalty <= 2,
               f"frequency_penalty={self.frequency_penalty} must be in [-2, 2]")
        _check(self.random_seed is None or isinstance(self.random_seed, int),
               f"random_seed={self.random_seed!r} must be an integer or None")
        _check(self.min_new_tokens is None or (isinstance(self.min_new_tokens, int) and self.min_new_tokens >= 0),
               f"min_new_tokens={self.min_new_tokens!r} must be an integer >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 20),
                   f"{name}={value!r} must be an integer in [0, 20] or None")
        for name, item_type in (("stop_words", str), ("bad_words", str),
                                ("stop_token_ids", int), ("bad_token_ids", int)):
            items = _as_tuple(getattr(self, name), name, item_type)
            if items is not None:
                _check(all(item != "" for item in items) if item_type is str else all(i >= 0 for i in items),
                       f"{name} must not contain empty strings or negative ids: {items!r}")
            object.__setattr__(self, name, items)
        object.__setattr__(self, "logit_bias", _check_logit_bias(self.logit_bias))
        object.__setattr__(self, "response_format", check_response_format(self.response_format))
        _check(not (self.response_format and (self.ignore_eos or self.min_new_tokens)),
               "response_format ends the answer when its grammar is complete: it cannot be combined with "
               "ignore_eos or min_new_tokens")
        _note_greedy_with_sampling_settings(self)

    @property
    def is_greedy(self) -> bool:
        """True when decoding takes the argmax without sampling: do_sample off or temperature 0."""
        return not self.do_sample or self.temperature == 0

    def replace(self, **changes) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)


RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "regex_schema", "choice", "grammar")


def check_response_format(value: Optional[dict]) -> Optional[dict]:
    """The response_format with its shape checked (ValueError names the fix); None for none or "text".

    Its grammar itself (a JSON schema, a regex, a Lark grammar) is checked by the grammar engine
    (chat/grammar.py), which also compiles it."""
    if value is None:
        return None
    _check(isinstance(value, dict) and value.get("type") in RESPONSE_FORMAT_TYPES,
           f"response_format must be an object whose type is one of {', '.join(RESPONSE_FORMAT_TYPES)}, "
           f"got {value!r}")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = value.get("json_schema")
        _check(isinstance(spec, dict) and isinstance(spec.get("schema", {}), (dict, bool)),
               "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
    elif kind != "json_object":
        payload = value.get(kind)
        expected = list if kind == "choice" else str
        _check(isinstance(payload, expected) and len(payload) > 0,
               f"response_format of type {kind} needs a non-empty {expected.__name__} under '{kind}'")
        if kind == "choice":
            _check(all(isinstance(c, str) and c for c in payload), "response_format choice must list non-empty strings")
    return value


def _check_logit_bias(value) -> Optional[Dict[int, float]]:
    if not value:
        return None
    _check(isinstance(value, dict), f"logit_bias must map token ids to biases, got {value!r}")
    bias: Dict[int, float] = {}
    for key, amount in value.items():
        token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key
        _check(isinstance(token, int) and not isinstance(token, bool) and token >= 0,
               f"logit_bias key {key!r} is not a token id (an integer >= 0, or its decimal string)")
        _check(isinstance(amount, (int, float)) and not isinstance(amount, bool) and -100 <= amount <= 100,
               f"logit_bias[{key!r}]={amount!r} must be a number in [-100, 100]")
        bias[token] = float(amount)
    return bias


_GREEDY_NOTE_SHOWN = False


def _note_greedy_with_sampling_settings(config: "GenerationConfig") -> None:
    """Log once per process when sampling settings come without do_sample: LMDeploy before 0.6
    sampled from them (a 0.3-era GenerationConfig(temperature=0.8, top_p=0.8, top_k=40)); here, as
    in current LMDeploy, do_sample=False decodes greedily. temperature=0 is a deliberate greedy."""
    global _GREEDY_NOTE_SHOWN
    if _GREEDY_NOTE_SHOWN or config.do_sample or config.temperature == 0:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(GenerationConfig)}
    changed = [name for name in ("temperature", "top_p", "top_k", "min_p") if getattr(config, name) != defaults[name]]
    if changed:
        _GREEDY_NOTE_SHOWN = True
        settings = ", ".join(f"{name}={getattr(config, name)}" for name in changed)
        logger.warning("GenerationConfig(%s) with do_sample=False decodes greedily (the settings are not used); "
                       "pass do_sample=True to sample (shown once)", settings)


def config_fields(cls) -> Sequence[dataclasses.Field]:
    """The declared fields of a config class, in order (used to build CLI flags)."""
    return dataclasses.fields(cls)


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to know about a loaded model (built by its model class from config.json).

    Architecture-specific settings stay in the model class; this holds only what sizes the KV
    cache, bounds sequences and ends them.
    """

    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str  # config.json's model_type, e.g. "llama"
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: Tuple[int, ...] = ()  # from generation_config.json, else config.json
    bos_token_id: Optional[int] = None
    checkpoint_dtype: Optional[str] = None  # config.json's torch_dtype / dtype, e.g. "bfloat16"
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Bytes of KV cache one token takes over all layers (keys and values)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size
