"""gptoss: fast, small inference for OpenAI's gpt-oss models."""

from .config import ConfigError, EngineConfig, ModelConfig
from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "ModelConfig",
           "EngineConfig", "ConfigError"]
