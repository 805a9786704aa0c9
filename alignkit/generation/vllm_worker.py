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

    def alignkit_lora_ids(self) -> list[int]:
        """The ids of the LoRA adapters this worker holds: vLLM's API does not say which id it gave an
        adapter it loaded, so the trainer compares this list before and after the load."""
        return sorted(self.list_loras())

    def alignkit_reload_lora(self, lora_int_id: int, lora_path: str) -> None:
        """A LoRA run's next adapter read from `lora_path` in place of adapter `lora_int_id`: the
        requests in flight and the new ones all name that id, so after the resume every one goes on
        with the new weights (partial rollouts with LoRA, as a full-weight reload gives them).

        Why not vLLM's own in-place load (`load_inplace` through `/v1/load_lora_adapter`): the
        requests made after it carry the flag, and the worker then reads the adapter from disk
        again at every engine step; this reads it once."""
        from vllm.lora.request import LoRARequest

        self.add_lora(LoRARequest(f"alignkit-{lora_int_id}", int(lora_int_id), lora_path, load_inplace=True))
