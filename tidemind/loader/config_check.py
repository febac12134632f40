"""Value types of config.json, checked before a model is built from it.

A model class reads config.json's values as they are: a `"hidden_size": "4096"` or a
`"num_attention_heads": [9]` would otherwise surface as a torch error deep inside a layer's
constructor. Keys not listed here are the model's business (its own checks, or load_model's
backstop that names the file).
"""
from __future__ import annotations

import json
import numbers
from typing import Callable, Dict, Optional, Tuple

from .errors import CheckpointError


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return _int(value) and value > 0


def _non_negative_int(value) -> bool:
    return _int(value) and value >= 0


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _token_ids(value) -> bool:  # any sign: old Llama configs say "pad_token_id": -1
    return _int(value) or (isinstance(value, list) and all(_int(v) for v in value))


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# kind name -> (test, what the message says the value must be)
_KINDS: Dict[str, Tuple[Callable[[object], bool], str]] = {
    "size": (_positive_int, "a positive integer"),
    "count": (_non_negative_int, "an integer >= 0"),
    "number": (_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "strings": (_strings, "a list of strings"),
    "token_ids": (_token_ids, "a token id or a list of token ids"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}
# Keys the models need: null is no more valid than absent.
REQUIRED = {"hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"}
# Keys the supported architectures read (text_config holds them for multimodal Gemma 3); null means
# "the default" for all but REQUIRED.
CONFIG_KEYS = {
    **dict.fromkeys(["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "vocab_size", "intermediate_size", "max_position_embeddings", "sliding_window",
                     "sliding_window_pattern", "_sliding_window_pattern"], "size"),
    **dict.fromkeys(["max_window_layers"], "count"),
    **dict.fromkeys(["rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
                     "final_logit_softcapping", "attn_logit_softcapping"], "number"),
    **dict.fromkeys(["tie_word_embeddings", "attention_bias", "mlp_bias", "bias", "use_sliding_window",
                     "use_bidirectional_attention"], "bool"),
    **dict.fromkeys(["model_type", "hidden_act", "hidden_activation", "torch_dtype", "dtype"], "str"),
    **dict.fromkeys(["architectures", "layer_types"], "strings"),
    **dict.fromkeys(["bos_token_id", "eos_token_id", "pad_token_id"], "token_ids"),
    **dict.fromkeys(["rope_scaling", "rope_parameters", "text_config"], "object"),
}
GENERATION_CONFIG_KEYS = dict.fromkeys(["bos_token_id", "eos_token_id", "pad_token_id"], "token_ids")


def _fix(value, expected: str) -> str:
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if parsed is not None and not isinstance(parsed, str):
            return f"write it without quotes: {value}"
    return f"set it to {expected} (the model's original config file has the right value)"


def _describe(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_config_values(config: dict, path: str, keys: Optional[Dict[str, str]] = None, prefix: str = "") -> None:
    """CheckpointError for the first value of `config` (read from the file `path`) whose type is
    not the one its key takes (`keys`: key -> kind of _KINDS; default: config.json's keys)."""
    keys = CONFIG_KEYS if keys is None else keys
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds {_describe(config)}, not a JSON object: restore the model's original "
                              f"file")
    for key, kind in keys.items():
        if key not in config:
            continue
        value = config[key]
        test, expected = _KINDS[kind]
        if value is None and key not in REQUIRED:
            continue
        if not test(value):
            raise CheckpointError(f"{path}: '{prefix}{key}' must be {expected}, not {_describe(value)}; "
                                  f"{_fix(value, expected)}")
    if isinstance(config.get("text_config"), dict):
        check_config_values(config["text_config"], path, keys, prefix=f"{prefix}text_config.")
