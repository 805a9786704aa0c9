"""Text generation behind one small protocol (transformers today; vLLM joins in its issue)."""

from alignkit.generation.hf import SamplingParams, generate

__all__ = ["SamplingParams", "generate"]
