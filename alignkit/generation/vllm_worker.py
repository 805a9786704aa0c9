"""Code that runs inside vLLM's worker processes (vLLM's `worker_extension_cls`: these methods are
added to its worker, and `collective_rpc` calls them by name, in-process or through a server).

Imported by vLLM's workers only, so it imports nothing from alignkit and no vLLM at module level.
"""

from __future__ import annotations

import logging

# vLLM's layer-by-layer reload warns "<Layer>: Failed to load weights" for each layer the file has
# no tensor for: a tied output head (stored once, as the embedding) and layers holding only
# buffers (rotary embeddings). The trainer checks before every update that the file carries every
# tensor of the engine's checkpoint under the same names and shapes (vllm_engine.check_weights),
# so these warnings only say what is expected, and at every update they would alarm users.
_NOTHING_TO_LOAD = ": Failed to load weights"


class _ExpectedGaps(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith(_NOTHING_TO_LOAD)


class WeightSync:
    """Weight updates from the trainer: vLLM's in-place `reload_weights` from a safetensors
    directory, then the kernels derived from tied weights rebuilt.

    Why the second part: vLLM reloads layer by layer and re-prepares each layer that received
    weights. A tied output head (`lm_head` = `embed_tokens`, as in SmolLM2 and most small models)
    receives none (the checkpoint stores the tensor once, under the embedding's name), so on CPU
    its prepacked matmul kernel would keep computing with the old embedding. Re-running its
    `process_weights_after_loading` rebuilds that kernel from the updated, shared tensor."""

    def alignkit_reload_weights(self, weights_path: str) -> None:
        model = self.model_runner.get_model()
        config = getattr(model, "config", None)
        head = getattr(model, "lm_head", None)
        method = getattr(head, "quant_method", None)
        tied = getattr(config, "tie_word_embeddings", False) and method is not None
        log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        if not any(isinstance(f, _ExpectedGaps) for f in log.filters):
            log.addFilter(_ExpectedGaps())
        self.reload_weights(weights_path=weights_path)
        if tied:
            method.process_weights_after_loading(head)
