"""LMDeploy's engine configs, taken as they are written in scripts: ``PytorchEngineConfig`` and
``TurbomindEngineConfig`` accept every argument of LMDeploy 0.3 and of the current release and
build a tidemind ``EngineConfig`` (they are subclasses of it).

Each LMDeploy-only argument has one rule (``_RULES``):
- ``Alias``: the same setting under tidemind's name (``block_size`` -> ``cache_block_seq_len``);
- ``Only``: accepted at the values that ask for nothing tidemind lacks (``dp=1``, ``adapters=None``);
  any other value is a ValueError naming what is missing and what to do instead;
- ``Note``: no effect in tidemind (``download_dir``: nothing is ever downloaded); a value other than
  LMDeploy's default is logged once per name, saying why it changes nothing.
Arguments both projects have (``tp``, ``session_len``, ``quant_policy``, ``enable_prefix_caching``,
``num_cpu_blocks``, ...) are EngineConfig fields, checked there; a name listed below that EngineConfig
gains later becomes its field (and its rule goes unused).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import InitVar, dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

from .config import EngineConfig

logger = logging.getLogger("tidemind")

_UNSET = object()  # an argument the script did not pass
_NOTED: set = set()  # names already logged in this process


@dataclass(frozen=True)
class Alias:
    field: str  # the EngineConfig field it sets
    convert: Optional[Callable[[Any], Any]] = None  # value -> the field's value (raises ValueError)


@dataclass(frozen=True)
class Only:
    allowed: Tuple  # values that need nothing tidemind lacks
    missing: str  # what a different value asks for, and the way to do without it


@dataclass(frozen=True)
class Note:
    default: Any  # LMDeploy's default: passing it is silent
    why: str  # why the setting changes nothing in tidemind


def _device(value: str) -> str:
    if value not in ("cuda", "cpu"):
        raise ValueError(f"device_type={value!r}: tidemind runs on cuda or cpu devices; pass device_type='cuda' "
                         f"(or device='cpu')")
    return value


_TP_ONLY = "tidemind splits a model over devices by tensor parallelism only (tp=N, one rank per device; across " \
              "nodes with distributed_executor_backend='ray'); for more throughput run one api_server per device " \
              "(or per tp group) behind `tidemind serve proxy`"
_DEFAULT_ROLE = ("Hybrid", "EngineRole.Hybrid", 0, None)


def _parallel(what: str) -> Only:
    return Only((1, None), f"{what} is not implemented in tidemind: {_TP_ONLY}")


# Union of LMDeploy 0.3 and current (0.18) arguments that EngineConfig does not have itself.
_RULES: Dict[str, Any] = {
    # ---- the same settings under other names
    "block_size": Alias("cache_block_seq_len"),
    "device_type": Alias("device", _device),
    # ---- what tidemind decides itself or does not need
    "model_name": Note(None, "pipeline() reads it (a built-in chat template name picks that template); "
                             "--model-name names a served model"),
    "download_dir": Note(None, "tidemind never downloads models: pass a local directory, a .gguf file or a "
                               "bundled name"),
    "revision": Note(None, "tidemind never downloads models, so there is no revision to pick"),
    "thread_safe": Note(False, "pipelines are always safe to call from several threads"),
    "prefill_interval": Note(16, "prefill and decode share every step (chunked prefill under "
                                 "max_prefill_token_num)"),
    "eviction_type": Note("recompute", "tidemind swaps preempted requests' KV to host memory when num_cpu_blocks "
                                       "(or swap_space) gives it a pool, and recomputes it otherwise"),
    "num_tokens_per_iter": Note(0, "the step's token budget is max_prefill_token_num"),
    "max_prefill_iters": Note(1, "the step's token budget is max_prefill_token_num"),
    "cache_chunk_size": Note(-1, "the KV cache is allocated once at start-up"),
    "kernel_block_size": Note(-1, "kernels read the KV cache in cache_block_seq_len blocks"),
    "cudagraph_capture_batch_sizes": Note(None, "decode graphs are captured for the batch sizes tidemind "
                                                "picks from max_batch_size"),
    "piecewise_cudagraph_max_tokens": Note(None, "only decode steps run as CUDA graphs"),
    "prefix_cache_state_budget": Note(0, "it configures LMDeploy's prefix cache for state-space models"),
    "prefix_cache_decode_state_interval": Note(0, "it configures LMDeploy's prefix cache for state-space models"),
    "cache_checkpoint_interval": Note(4096, "it configures TurboMind's prefix cache"),
    "cache_prompt": Note("auto", "it configures TurboMind's prefix cache"),
    "cache_prompt_boundary_skip": Note(1, "it configures TurboMind's prefix cache"),
    "cache_generation": Note("auto", "it configures TurboMind's prefix cache"),
    "empty_init": Note(False, "models are always built without initializing their weights"),
    "enable_metrics": Note(True, "the api_server always serves /metrics"),
    "enable_microbatch": Note(False, "steps are not split into micro-batches"),
    "enable_eplb": Note(False, "it balances experts of MoE models over devices"),
    "enable_mp_engine": Note(False, "the engine runs in a thread of the calling process"),
    "mp_engine_backend": Note("mp", "the engine runs in a thread of the calling process"),
    "communicator": Note("nccl", "tensor-parallel ranks talk over NCCL on GPUs and gloo on the CPU"),
    "moe_a2a_backend": Note("auto", "tidemind serves no MoE models: there is no all-to-all"),
    "async_": Note(1, "the engine always runs beside its callers"),
    "language_model_only": Note(False, "tidemind serves text models only"),
    "logprobs_mode": Note(None, "log-probabilities are always those of the raw logits"),
    "enable_transfer_obj_ref": Note(False, "there are no Ray object references to pass"),
    "gemm_input_dtype": Note(None, "matmuls run in the model's dtype"),
    "migration_backend": Note("DLSlime", "there is no KV migration between engines"),
    "dllm_unmasking_strategy": Note("low_confidence_dynamic", "it configures diffusion language models"),
    "dllm_denoising_steps": Note(None, "it configures diffusion language models"),
    "dllm_confidence_threshold": Note(0.85, "it configures diffusion language models"),
    "devices": Only((None, [0], (0,)), _TP_ONLY),
    # ---- settings asking for something tidemind cannot do
    "dp": _parallel("data parallelism"), "ep": _parallel("expert parallelism"),
    "cp": _parallel("context parallelism"), "nnodes": _parallel("running over several nodes"),
    "device_num": _parallel("running over several devices"), "attn_tp_size": _parallel("attention parallelism"),
    "attn_cp_size": _parallel("attention parallelism"), "attn_dp_size": _parallel("attention parallelism"),
    "mlp_tp_size": _parallel("MLP parallelism"), "mlp_dp_size": _parallel("MLP parallelism"),
    "moe_tp_size": _parallel("MoE parallelism"), "outer_dp_size": _parallel("data parallelism"),
    "dp_rank": Only((0,), _TP_ONLY), "node_rank": Only((0,), _TP_ONLY),
    "adapters": Only((None, {}), "LoRA adapters are not supported by tidemind; merge the adapter into the model's "
                                 "weights (e.g. with peft's merge_and_unload) and load that directory"),
    "custom_module_map": Only((None, {}), "tidemind builds models from its own registry (`tidemind list` shows "
                                          "the architectures)"),
    "hf_overrides": Only((None, {}), "edit the model's config.json instead (for rope scaling: rope_scaling_factor)"),
    "use_logn_attn": Only((False,), "Qwen-7B's log-n attention scaling is not implemented in tidemind"),
    "enable_return_routed_experts": Only((False,), "tidemind serves no MoE models"),
    "dllm_block_length": Only((None,), "diffusion language models are not supported"),
    "role": Only(_DEFAULT_ROLE, "prefill / decode disaggregation is not implemented in tidemind"),
    "kv_transfer_config": Only((None,), "there is no KV transfer between engines"),
}

PYTORCH_ARGS = (
    "model_name", "eviction_type", "prefill_interval", "block_size", "num_cpu_blocks", "adapters", "thread_safe",
    "download_dir", "revision", "dp", "dp_rank", "ep", "attn_tp_size", "mlp_tp_size", "moe_tp_size",
    "kernel_block_size", "cudagraph_capture_batch_sizes", "enable_prefix_caching", "prefix_cache_state_budget",
    "prefix_cache_decode_state_interval", "device_type", "custom_module_map", "distributed_executor_backend",
    "empty_init", "enable_microbatch", "enable_eplb", "enable_mp_engine", "mp_engine_backend", "enable_metrics",
    "hf_overrides", "language_model_only", "logprobs_mode", "enable_return_routed_experts",
    "enable_transfer_obj_ref", "dllm_block_length", "dllm_unmasking_strategy", "dllm_denoising_steps",
    "dllm_confidence_threshold", "role", "migration_backend", "kv_transfer_config", "piecewise_cudagraph_max_tokens",
)
TURBOMIND_ARGS = (
    "model_name", "use_logn_attn", "download_dir", "revision", "num_tokens_per_iter", "max_prefill_iters",
    "gemm_input_dtype", "dp", "cp", "ep", "device_num", "attn_tp_size", "attn_cp_size", "attn_dp_size",
    "mlp_tp_size", "mlp_dp_size", "outer_dp_size", "nnodes", "node_rank", "dist_init_addr", "devices",
    "cache_chunk_size", "enable_prefix_caching", "cache_checkpoint_interval", "cache_prompt",
    "cache_prompt_boundary_skip", "cache_generation", "async_", "empty_init", "language_model_only",
    "communicator", "moe_a2a_backend", "hf_overrides", "enable_metrics",
)


def _plain(value):
    """Enum members (LMDeploy's QuantPolicy.NONE, EngineRole.Hybrid) as their value."""
    return getattr(value, "value", value)


def _apply(name: str, value, changes: Dict[str, Any]) -> None:
    """Check one LMDeploy-only argument and record the EngineConfig changes it makes."""
    rule = _RULES[name]
    value = _plain(value)
    if isinstance(rule, Alias):
        changes[rule.field] = rule.convert(value) if rule.convert else value
    elif isinstance(rule, Only):
        if value not in rule.allowed and str(value) not in map(str, rule.allowed):
            raise ValueError(f"{name}={value!r}: {rule.missing}")
    elif value != rule.default and name not in _NOTED:
        _NOTED.add(name)
        logger.warning("engine setting %s=%r is accepted but has no effect in tidemind: %s", name, value, rule.why)


def _compat_post_init(self, *values) -> None:
    changes: Dict[str, Any] = {}
    for name, value in zip(type(self).LMDEPLOY_ARGS, values):
        if name == "model_name":  # LMDeploy 0.3 picked the chat template with it: pipeline() reads it
            object.__setattr__(self, "lmdeploy_model_name", None if value is _UNSET else value)
        elif value is not _UNSET:
            _apply(name, value, changes)
    for name, value in changes.items():
        object.__setattr__(self, name, value)
    object.__setattr__(self, "quant_policy", _plain(self.quant_policy))
    EngineConfig.__post_init__(self)


def _lmdeploy_config(class_name: str, args: Tuple[str, ...], doc: str) -> type:
    """A frozen dataclass subclass of EngineConfig whose LMDeploy-only arguments are InitVars: they
    are read once by __post_init__ and not stored, so dataclasses.replace() works as on EngineConfig.
    Arguments EngineConfig has itself (enable_prefix_caching, num_cpu_blocks, ...) stay its fields."""
    own = {f.name for f in dataclasses.fields(EngineConfig)}
    args = tuple(name for name in args if name not in own)
    namespace = {"__annotations__": {name: InitVar[Any] for name in args}, "__doc__": doc,
                 "__post_init__": _compat_post_init, "LMDEPLOY_ARGS": args,
                 **{name: _UNSET for name in args}}
    namespace["__annotations__"]["LMDEPLOY_ARGS"] = ClassVar[Tuple[str, ...]]
    cls = type(class_name, (EngineConfig,), namespace)
    cls.__module__ = __name__
    return dataclass(frozen=True)(cls)


PytorchEngineConfig = _lmdeploy_config(
    "PytorchEngineConfig", PYTORCH_ARGS,
    "LMDeploy's PytorchEngineConfig (0.3 and current arguments) as a tidemind EngineConfig.")
TurbomindEngineConfig = _lmdeploy_config(
    "TurbomindEngineConfig", TURBOMIND_ARGS,
    "LMDeploy's TurbomindEngineConfig (0.3 and current arguments) as a tidemind EngineConfig.")
_AnyEngineConfig = _lmdeploy_config(
    "LMDeployEngineConfig", tuple(dict.fromkeys(PYTORCH_ARGS + TURBOMIND_ARGS)),
    "Either LMDeploy engine config's arguments (pipeline(**kwargs) takes them all).")


def engine_config_from_kwargs(kwargs: Dict[str, Any]) -> EngineConfig:
    """pipeline(**kwargs): EngineConfig fields and any LMDeploy engine argument; TypeError names an
    argument neither has."""
    known = {f.name for f in dataclasses.fields(EngineConfig)} | set(_AnyEngineConfig.LMDEPLOY_ARGS)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"pipeline() got unknown argument(s) {', '.join(unknown)}: pass engine settings "
                        f"({', '.join(sorted(f.name for f in dataclasses.fields(EngineConfig)))}, or LMDeploy's "
                        f"PytorchEngineConfig / TurbomindEngineConfig arguments)")
    return _AnyEngineConfig(**kwargs)
