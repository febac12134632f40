"""tidemind: compress, deploy and serve large language models.

    from tidemind import pipeline, GenerationConfig, EngineConfig, ChatTemplateConfig
"""
from .config import EngineConfig, GenerationConfig
from .config_compat import PytorchEngineConfig, TurbomindEngineConfig
from .messages import Response

__version__ = "0.1.0"

__all__ = ["pipeline", "Pipeline", "GenerationConfig", "EngineConfig", "PytorchEngineConfig",
           "TurbomindEngineConfig", "ChatTemplateConfig", "Response", "__version__"]


def __getattr__(name):
    # The heavy parts (torch, transformers) load on first use, so `tidemind --help` stays fast.
    if name in ("pipeline", "Pipeline"):
        from . import api
        return getattr(api, name)
    if name == "ChatTemplateConfig":
        from .chat.templates import ChatTemplateConfig
        return ChatTemplateConfig
    raise AttributeError(f"module 'tidemind' has no attribute {name!r}")
