"""Every inference-time strategy behind one call, for `alignkit generate` and `alignkit eval`.

    result = run_strategy("deal", model, tokenizer, reward, prompts, columns, params, options)

`prompts` are message lists or strings, `columns` the extra fields rewards read (one value per
prompt), `params` the sampling settings of the model's proposals, `options` the strategy's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.errors import ConfigError
from alignkit.generation.backends import TransformersBackend
from alignkit.generation.decode import SamplingParams
from alignkit.generation.hf import encode_prompts
from alignkit.inference.best_of_n import best_of_n, sample_once, soft_best_of_n
from alignkit.inference.result import StrategyResult

# name -> what it does (the help text of `alignkit generate --strategy`)
STRATEGIES = {
    "sample": "one sample per prompt (the baseline)",
    "best-of-n": "the highest-reward of --n samples (KL <= log n - (n-1)/n, arXiv 2401.01879)",
    "soft-best-of-n": "one of --n samples drawn with weights exp(reward / --soft-temperature)",
    "deal": "tree search over blocks of --block tokens: --candidates children per node, scored by the reward "
    "after --lookahead more tokens, --beam kept (arXiv 2402.06147)",
    "controlled-decoding": "token-level: the top --candidates tokens reweighted by exp(--strength * value), with a "
    "value head from `alignkit fit-value` (--value) (arXiv 2310.17022)",
    "transfer-q": "per block, the --candidates proposal with the highest reward after a --horizon-token "
    "continuation by --baseline, a model aligned to the reward (arXiv 2405.20495)",
    "urial": "in-context alignment of a base model: system text and stylistic examples from an editable "
    "template (--urial-template) (arXiv 2312.01552)",
    "rewrite": "the model first rewrites each instruction to state its intent and constraints (greedy), then "
    "answers the rewrite; the reward judges the answer against the original prompt (P-Aligner, "
    "arXiv 2508.04626)",
}


@dataclass
class StrategyOptions:
    n: int = 8  # best-of-n, soft-best-of-n
    soft_temperature: float = 0.1
    beam: int = 2  # deal
    candidates: int = 4  # deal, transfer-q, controlled-decoding
    block: int = 8  # deal, transfer-q: tokens committed per step
    lookahead: int = 16  # deal
    value: str | None = None  # controlled-decoding: a value-head directory
    strength: float = 1.0  # controlled-decoding
    baseline: str | None = None  # transfer-q: the aligned model
    horizon: int = 32  # transfer-q
    urial_template: str | None = None


SAMPLER_STRATEGIES = ("sample", "best-of-n", "soft-best-of-n")  # need only whole samples: any backend serves


def run_strategy(
    name: str,
    model,
    tokenizer,
    reward,
    prompts: list,
    columns: dict,
    params: SamplingParams,
    options: StrategyOptions = StrategyOptions(),
    *,
    seed: int = 0,
    batch_size: int = 8,
    prompt_ids: list | None = None,
    baseline_model=None,
    progress: bool = False,
    sampler=None,
) -> StrategyResult:
    """Run strategy `name` on the prompts. `prompt_ids` (chat-rendered, possibly truncated token
    ids) default to the prompts encoded with the tokenizer's chat template; `baseline_model`
    (transfer-q) may be passed loaded, otherwise options.baseline is loaded. `progress` shows a
    progress bar over the prompts. `sampler`: a generation backend (vLLM) for the strategies that
    only need whole samples; by default alignkit's own sampler over `model`."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")
    if sampler is not None and name not in SAMPLER_STRATEGIES:
        raise ConfigError(
            f"strategy {name} steers every token through the model itself, which a vLLM engine does "
            f"not expose; use --backend transformers (vLLM serves {', '.join(SAMPLER_STRATEGIES)})."
        )
    if any(getattr(ids, "vision", None) is not None for ids in prompt_ids or ()) and (
        name not in SAMPLER_STRATEGIES or sampler is not None
    ):
        raise ConfigError(
            f"the prompts hold images, which alignkit's own sampler reads once per prompt; strategy {name} runs "
            "its own forward passes (and a vLLM engine takes token ids only): use --backend transformers with "
            f"{', '.join(SAMPLER_STRATEGIES)}."
        )
    if name == "urial":
        from alignkit.inference.urial import urial

        return urial(
            model,
            tokenizer,
            reward,
            prompts,
            columns,
            params,
            template=options.urial_template,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
    if name == "rewrite":
        return _rewrite_then_answer(model, tokenizer, reward, prompts, columns, params, seed, batch_size, progress)
    ids = prompt_ids if prompt_ids is not None else encode_prompts(tokenizer, prompts)
    if name in SAMPLER_STRATEGIES:
        backend = sampler or TransformersBackend(model, tokenizer, batch_size, progress=progress)
        p = params.but(n=options.n)
        if name == "sample":
            return sample_once(backend, reward, prompts, ids, columns, p, seed)
        if name == "best-of-n":
            return best_of_n(backend, reward, prompts, ids, columns, p, seed)
        return soft_best_of_n(backend, reward, prompts, ids, columns, p, seed, temperature=options.soft_temperature)
    if name == "controlled-decoding":
        from alignkit.inference.controlled import controlled_decoding
        from alignkit.inference.value import ValueHead

        if not options.value:
            raise ConfigError(
                "controlled-decoding needs a value head (--value DIR); fit one with "
                "`alignkit fit-value --model M --prompts P --reward R --output DIR`."
            )
        value = ValueHead.load(options.value, model.config.hidden_size)
        return controlled_decoding(
            model,
            tokenizer,
            reward,
            prompts,
            ids,
            columns,
            params,
            value,
            candidates=options.candidates,
            strength=options.strength,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
    from alignkit.inference.search import SearchParams, block_search

    sp = SearchParams(options.beam, options.candidates, options.block, options.lookahead, None, options.horizon)
    if name == "transfer-q":
        if baseline_model is None:
            if not options.baseline:
                raise ConfigError(
                    "transfer-q needs --baseline: a model aligned to the target reward (for example "
                    "a DPO or GRPO run's final/ directory) that shares the model's tokenizer."
                )
            baseline_model = _load_like(options.baseline, model)
        sp.beam, sp.baseline = 1, baseline_model
    return block_search(
        model,
        tokenizer,
        reward,
        prompts,
        ids,
        columns,
        params,
        sp,
        seed=seed,
        batch_size=batch_size,
        strategy=name,
        progress=progress,
    )


def _rewrite_then_answer(model, tokenizer, reward, prompts, columns, params, seed, batch_size, progress):
    from alignkit.generation.text_models import LocalModel
    from alignkit.inference.rewrite import rewrite_messages

    convs = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    rewritten = rewrite_messages(
        LocalModel(model, tokenizer, batch_size),
        convs,
        params.but(n=1, temperature=0.0, max_new_tokens=max(params.max_new_tokens, 96)),
        seed,
        progress=progress,
    )
    backend = TransformersBackend(model, tokenizer, batch_size, progress=progress)
    out = sample_once(backend, reward, prompts, encode_prompts(tokenizer, list(rewritten)), columns, params, seed)
    out.strategy, out.kl, out.kl_kind = "rewrite", None, None  # the answer's distribution is another prompt's
    out.info = {
        "rewritten_prompts": [next(m["content"] for m in reversed(c) if m["role"] == "user") for c in rewritten],
        "kept_original": len(rewritten.fallbacks),
    }
    return out


def _load_like(path: str, like):
    from alignkit.config import ModelConfig
    from alignkit.models import load_model

    return load_model(
        ModelConfig(name_or_path=path, dtype="float32"), device=next(like.parameters()).device, for_training=False
    ).eval()
