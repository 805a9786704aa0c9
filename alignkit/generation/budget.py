"""The thinking budget (`generation.max_thinking_tokens`) on a generation backend that takes and
returns token ids (a vLLM engine or server, an `alignkit sample-serve`), which alignkit cannot
step token by token as it does its own sampler (`decode.Thinking`).

Each sample is generated in phases, each a request whose prompt is everything so far (the engine's
prefix cache keeps it): outside a reasoning block, until the model opens one (a stop on the
opening tag); inside one, until it closes it (a stop on the closing tag) or the block reaches the
budget, where the closing tag's tokens are appended as context (no log-prob, not scored:
`Sample.mask`), as the own sampler inserts them. Phase j of row r samples with seed
`row_seed(seed of r, j)`, so the result does not depend on the batch. The samples are not those
the own sampler draws (other random streams), only as deterministic.

Every phase names the request's `min_version` (an asynchronous run's), and each token records the
policy version that sampled it (the backend's label, else `min_version`; an inserted tag, the
version of the token before it), so phases sampled on either side of a weight update are a
partial rollout the staleness metrics see.
"""

from __future__ import annotations

from alignkit.generation.decode import Sample, SamplingParams, Thinking, eos_ids, row_seed


class BudgetedBackend:
    """`backend` with the thinking budget of the `SamplingParams` it is given applied (see the
    module docstring); params without a budget go to `backend` as they are."""

    def __init__(self, backend, tokenizer):
        self.backend, self.tokenizer = backend, tokenizer

    def __getattr__(self, name):  # sync, close, load_state, ...: the wrapped backend's
        return getattr(self.backend, name)

    def sample(
        self, prompts: list, params: SamplingParams, seed: int, prompt_seeds: list | None = None, min_version: int = 0
    ) -> list[list[Sample]]:
        if params.max_thinking_tokens is None or not params.thinking_open:
            return self.backend.sample(prompts, params, seed, prompt_seeds, min_version)
        n = params.n
        base = list(prompt_seeds) if prompt_seeds is not None else [row_seed(seed, i) for i in range(len(prompts))]
        seeds = [row_seed(base[i], k) for i in range(len(prompts)) for k in range(n)]
        rows = [list(p) for p in prompts for _ in range(n)]
        think = Thinking(params, rows, lambda ids: self.tokenizer.decode(ids))
        eos = eos_ids(self.tokenizer)
        out = [Sample([], [], "length", mask=[], versions=[]) for _ in rows]
        live, phase = [True] * len(rows), 0
        while any(live):
            asks: dict[tuple, list] = {}
            for r in range(len(rows)):
                if not live[r]:
                    continue
                room = params.max_new_tokens - len(out[r].token_ids)
                if think.inside[r]:  # until the block closes, or at most up to the budget
                    key = (min(room, max(think.budget - think.block[r], 1)), think.close_text)
                else:
                    key = (room, think.open_text)
                asks.setdefault(key, []).append(r)
            for (size, stop), group in sorted(asks.items()):
                got = self.backend.sample(
                    [rows[r] + out[r].token_ids for r in group],
                    params.but(n=1, max_new_tokens=size, stop=tuple(params.stop) + (stop,)),
                    seed,
                    [row_seed(seeds[r], phase) for r in group],
                    min_version,
                )
                for r, (s,) in zip(group, got):
                    self._take(r, s, out[r], think, eos, params, live, min_version)
            phase += 1
        for r, s in enumerate(out):
            s.text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True).strip()
            s.reasoning_tokens, s.answer_tokens, s.thinking_cut = think.reasoning[r], think.answer[r], think.cut[r]
            s.mask = s.mask if think.cut[r] else None
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _take(self, r: int, s: Sample, sample: Sample, think: Thinking, eos: set, params, live: list, version: int):
        """Append one phase's tokens to row `r`'s sample; decide whether the row goes on."""
        assert sample.mask is not None and sample.versions is not None  # both built token by token here
        for tok, lp, v in zip(s.token_ids, s.logprobs, s.versions or [version] * len(s.token_ids)):
            sample.token_ids.append(tok)
            sample.logprobs.append(lp)
            sample.mask.append(True)
            sample.versions.append(v)
            think.add(r, tok)
        if s.token_ids and s.token_ids[-1] in eos:
            sample.finish_reason, live[r] = "stop", False
        elif s.finish_reason == "stop" and any(x in s.text for x in params.stop):
            sample.finish_reason, live[r] = "stop", False  # the user's own stop string
        elif think.inside[r] and think.pending[r]:  # the block ran to the budget: close it as context
            while think.pending[r] and len(sample.token_ids) < params.max_new_tokens:
                tok = think.forced(r)
                sample.token_ids.append(tok)
                sample.mask.append(False)
                sample.versions.append(sample.versions[-1] if sample.versions else version)
                think.add(r, tok)
        if len(sample.token_ids) >= params.max_new_tokens:
            live[r] = False
