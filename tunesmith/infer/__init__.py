"""Inference: generation (streaming, stop words, KV cache, compiled decode on CUDA), chat sessions kept as
token ids, MOSS plugins, the ReAct agent and its tools, and a small Python API (`Chat`)."""

from tunesmith.infer.api import Chat, load_for_chat
from tunesmith.infer.generate import Generator
from tunesmith.infer.sampling import GenerationResult, SamplingConfig
from tunesmith.infer.session import ChatSession

__all__ = ["Chat", "ChatSession", "GenerationResult", "Generator", "SamplingConfig", "load_for_chat"]
