"""Model resolution (bundled names, GGUF files, directories) and weight loading."""
from .bundled import BUNDLED_MODELS, DEFAULT_MODEL, BundledModel, find_bundled
from .checkpoint import CheckpointError, load_model, read_quantization
from .resolve import ResolvedModel, cache_root, resolve_model
from ..models.weights import MissingWeightsError
from ..layers.linear import WeightShapeError

__all__ = ["BUNDLED_MODELS", "DEFAULT_MODEL", "BundledModel", "find_bundled", "CheckpointError", "load_model",
           "read_quantization",
           "ResolvedModel", "cache_root", "resolve_model", "MissingWeightsError", "WeightShapeError"]
