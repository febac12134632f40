"""Architecture name (config.json "architectures") -> model class. A new model is one line here.

Modules are imported on first use, so listing architectures costs nothing.
"""
from __future__ import annotations

import importlib
from typing import List

# architecture name -> (module under tidemind.models, class name)
_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "InternLM2ForCausalLM": ("internlm2", "InternLM2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("gemma3", "Gemma3ForConditionalGeneration"),
}


def supported_architectures() -> List[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type:
    if architecture not in _MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported; supported architectures: "
                         f"{', '.join(supported_architectures())}")
    module_name, class_name = _MODELS[architecture]
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, class_name)
