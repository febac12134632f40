"""The quantization method interface and its string registry.

A checkpoint records how it was quantized in config.json's `quantization_config` (the key
transformers, AutoAWQ, AutoGPTQ and LMDeploy write); `quantization_from_hf_config` reads it, and
the resulting config hands every layer its LinearMethod by prefix (BuildContext.linear_method).
Nothing is guessed from file or directory names: a checkpoint without quantization_config is
dense, one whose method is not registered here is refused with a message naming it.

    config.json "quant_method"   tidemind method (module)      weights
    awq                          AWQConfig (awq.py)            int4 qweight [in, out/8], AutoAWQ GEMM order
    gptq                         GPTQConfig (gptq.py)          int4/int8 qweight [in/8, out] (or [in/4, out])
    smooth_quant                 SmoothQuantConfig (w8a8.py)   int8 weight [out, in], per-token int8 inputs
    gguf                         GGUFConfig (gguf.py)          GGUF block integers int8 [out, in] + scales, CPU
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

from ..linear import LinearMethod, UnquantizedLinearMethod


class QuantizationConfigError(ValueError):
    """A quantization_config tidemind cannot run, or one that contradicts --model-format."""


# quant_method -> (module under tidemind.layers.quantization, class name); a new method is a file
# plus a line here.
_METHODS: Dict[str, Tuple[str, str]] = {
    "awq": ("awq", "AWQConfig"),
    "gptq": ("gptq", "GPTQConfig"),
    "smooth_quant": ("w8a8", "SmoothQuantConfig"),
    "gguf": ("gguf", "GGUFConfig"),
}

# Layers no method quantizes unless it says so: checkpoints keep them dense.
DENSE_BY_DEFAULT: Tuple[str, ...] = ("lm_head", "embed_tokens")


def quantization_methods() -> Tuple[str, ...]:
    return tuple(_METHODS)


@dataclass(frozen=True)
class QuantizationConfig(ABC):
    """One checkpoint's quantization settings (frozen: part of the BuildContext)."""

    name: ClassVar[str]  # quant_method as written in config.json
    # module-name fragments left dense (transformers' / AutoAWQ's modules_to_not_convert)
    modules_to_not_convert: Tuple[str, ...] = ()

    @classmethod
    @abstractmethod
    def from_hf(cls, quantization_config: dict) -> "QuantizationConfig":
        """Validate config.json's quantization_config; raise QuantizationConfigError naming the field."""

    @abstractmethod
    def to_hf(self) -> dict:
        """The quantization_config to write into config.json (read back by from_hf and by other tools)."""

    @abstractmethod
    def quantized_method(self, prefix: str) -> LinearMethod:
        """The method of a layer this config quantizes."""

    def quantizes(self, prefix: str) -> bool:
        parts = DENSE_BY_DEFAULT + tuple(self.modules_to_not_convert)
        return not any(part and part in prefix for part in parts)

    def linear_method(self, prefix: str) -> LinearMethod:
        return self.quantized_method(prefix) if self.quantizes(prefix) else UnquantizedLinearMethod()

    def describe(self) -> str:
        return self.name


def read_field(quantization_config: dict, *names: str, default=None):
    """The first of `names` present in quantization_config (tools spell some fields differently:
    transformers' "bits" is AutoAWQ's "w_bit")."""
    for name in names:
        if quantization_config.get(name) is not None:
            return quantization_config[name]
    return default


def require(condition: bool, message: str) -> None:
    if not condition:
        raise QuantizationConfigError(message)


def get_quantization_class(method: str) -> type:
    if method not in _METHODS:
        raise QuantizationConfigError(
            f"the checkpoint is quantized with quant_method={method!r}, which tidemind cannot run; supported: "
            f"{', '.join(_METHODS)}. Use the unquantized model, or quantize it with `tidemind lite auto_awq` / "
            f"`tidemind lite smooth_quant`")
    module_name, class_name = _METHODS[method]
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, class_name)


def quantization_from_hf_config(hf_config: dict, model_format: Optional[str] = None,
                                where: str = "config.json") -> Optional[QuantizationConfig]:
    """The checkpoint's quantization (None: dense), checked against --model-format when given.

    model_format: None (read it from the checkpoint), "hf" (the checkpoint must be dense) or a
    quant_method name ("awq", "gptq", "smooth_quant") the checkpoint must record.
    """
    recorded = hf_config.get("quantization_config")
    if recorded is not None and not isinstance(recorded, dict):
        raise QuantizationConfigError(f"{where}: quantization_config must be an object, got {recorded!r}")
    method = (recorded or {}).get("quant_method")
    if recorded is not None and not method:
        raise QuantizationConfigError(f"{where}: quantization_config has no quant_method; add the method it was "
                                      f"made with, e.g. \"quant_method\": \"awq\"")
    method = method.lower() if method else None
    if model_format not in (None, "hf") and model_format not in _METHODS:
        raise QuantizationConfigError(f"model_format={model_format!r} is not one of hf, {', '.join(_METHODS)}")
    if model_format == "hf" and method is not None:
        raise QuantizationConfigError(f"{where} records quant_method={method!r} but --model-format hf was given; "
                                      f"pass --model-format {method} or leave the flag out")
    if model_format not in (None, "hf") and method != model_format:
        found = f"records quant_method={method!r}" if method else "has no quantization_config (a dense model)"
        hint = (f"quantize it first with `tidemind lite {'smooth_quant' if model_format == 'smooth_quant' else 'auto_awq'}"
                f" MODEL`" if method is None else f"pass --model-format {method}")
        raise QuantizationConfigError(f"--model-format {model_format} was given but {where} {found}; {hint}, "
                                      f"or leave the flag out")
    if method is None:
        return None
    return get_quantization_class(method).from_hf(recorded)
