"""Text generation behind one small protocol (`backends`): alignkit's own KV-cache sampler over any
transformers model, and a vLLM backend (written against vLLM's API, untested here)."""

from alignkit.generation.hf import SamplingParams, generate

__all__ = ["SamplingParams", "generate"]
