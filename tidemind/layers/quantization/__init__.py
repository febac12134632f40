"""Quantized linear methods behind one interface (base.py) and a string registry: AWQ and GPTQ
W4A16 (awq.py, gptq.py) and SmoothQuant W8A8 (w8a8.py), chosen by the checkpoint's
quantization_config."""
from .base import (QuantizationConfig, QuantizationConfigError, get_quantization_class, quantization_from_hf_config,
                   quantization_methods)

__all__ = ["QuantizationConfig", "QuantizationConfigError", "get_quantization_class", "quantization_from_hf_config",
           "quantization_methods"]
