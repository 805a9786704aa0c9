"""Generation backends behind one small protocol, so online training and inference-time search do
not care who samples.

    backend.sample(prompts: list[list[int]], params, seed, prompt_seeds=None) -> list[list[Sample]]   # n per prompt
    backend.sync(model)                                                           # after each update

`TransformersBackend` (the default) samples with the policy module itself through
`alignkit.generation.decode`, so there is nothing to sync. `VLLMBackend` runs a vLLM engine on
the same GPU and loads the policy's weights into it after each optimizer step. It is written
against vLLM's public API (`LLM`, `SamplingParams`, `TokensPrompt`, `LLM.apply_model`) and is
UNTESTED here: no machine this project is developed on can run vLLM.
"""

from __future__ import annotations

from typing import Protocol

from alignkit.errors import ConfigError
from alignkit.generation.decode import Sample, SamplingParams, sample


class GenerationBackend(Protocol):
    def sample(self, prompts: list, params: SamplingParams, seed: int,
               prompt_seeds: list | None = None) -> list[list[Sample]]: ...

    def sync(self, model) -> None: ...


class TransformersBackend:
    def __init__(self, model, tokenizer, batch_size: int = 16, progress: bool = False):
        self.model, self.tokenizer, self.batch_size, self.progress = model, tokenizer, batch_size, progress

    def sample(self, prompts: list, params: SamplingParams, seed: int,
               prompt_seeds: list | None = None) -> list[list[Sample]]:
        return sample(self.model, prompts, params, eos_ids=self.tokenizer.eos_token_id,
                      pad_id=self.tokenizer.pad_token_id, batch_size=self.batch_size, seed=seed,
                      tokenizer=self.tokenizer, progress=self.progress, prompt_seeds=prompt_seeds)

    def sync(self, model) -> None:
        self.model = model  # the same module: its weights are always current


class VLLMBackend:
    """vLLM generation with the policy's weights loaded in after each update (untested here)."""

    def __init__(self, model_path: str, tokenizer, gpu_memory_utilization: float = 0.3, dtype: str = "bfloat16"):
        try:
            from vllm import LLM
        except ImportError:
            raise ConfigError("generation.backend=vllm needs vLLM: `pip install vllm` on a CUDA machine, "
                              "or use generation.backend=transformers.") from None
        self.tokenizer = tokenizer
        self.llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       enable_prefix_caching=True)  # a prompt's n samples share its prefill

    def sample(self, prompts: list, params: SamplingParams, seed: int,
               prompt_seeds: list | None = None) -> list[list[Sample]]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        def settings(s: int):
            return VSamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                   top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                                   stop=list(params.stop) or None, include_stop_str_in_output=True, logprobs=0,
                                   seed=s)
        sp = settings(seed) if prompt_seeds is None else [settings(s) for s in prompt_seeds]  # a seed per request
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        result = []
        for out in outputs:
            group = []
            for c in out.outputs:
                # logprobs=0 returns the sampled token's log-prob at each step (vLLM's raw log-probs)
                lps = [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]
                group.append(Sample(list(c.token_ids), lps, "length" if c.finish_reason == "length" else "stop",
                                    self.tokenizer.decode(c.token_ids, skip_special_tokens=True).strip()))
            result.append(group)
        return result

    def sync(self, model) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(model, "merge_adapter"):  # LoRA: load merged weights, then unmerge for training
            model.merge_adapter()
        try:
            weights = [(k.replace("base_model.model.", ""), v.detach().to("cpu")) for k, v in base.state_dict().items()
                       if "lora_" not in k]
            self.llm.apply_model(lambda m: m.load_weights(iter(weights)))
        finally:
            if hasattr(model, "unmerge_adapter"):
                model.unmerge_adapter()


def make_backend(name: str, model, tokenizer, model_path: str, batch_size: int):
    if name == "transformers":
        return TransformersBackend(model, tokenizer, batch_size)
    if name == "vllm":
        return VLLMBackend(model_path, tokenizer)
    raise ConfigError(f"`generation.backend` must be transformers or vllm; got {name!r}.")
