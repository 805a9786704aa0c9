"""Sampling, best-of-N and soft best-of-N with any alignkit reward.

Each prompt's N candidates come from one batched call that prefills the prompt once and shares
its KV cache among the N samples (`alignkit.generation.decode`), so N candidates cost N
completions but one prompt.

- best-of-N returns the candidate with the highest reward. Its KL from the base policy is at most
  log N - (N - 1) / N (the analytical bound, arXiv 2401.01879, which shows it is tight in practice
  and an upper bound in general).
- soft best-of-N samples candidate i with probability exp(r_i / T) / sum_j exp(r_j / T)
  (temperature T > 0): T -> 0 is best-of-N, T -> inf is plain sampling. Any rule that returns one
  of N independent samples gives each text at most N times its sampling probability, so its KL is
  at most log N; that is the bound soft best-of-N reports.
"""

from __future__ import annotations

import math
import time

import torch

from alignkit.generation.decode import SamplingParams
from alignkit.inference.result import Choice, StrategyResult
from alignkit.rewards.functions import score_groups


def best_of_n_kl_bound(n: int) -> float:
    """KL(best-of-n || base) <= log n - (n - 1) / n (arXiv 2401.01879)."""
    return math.log(n) - (n - 1) / n


def select_soft(rewards: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """[P, N] rewards -> [P] indices drawn with probability softmax(r / temperature)."""
    if temperature <= 0:
        raise ValueError(f"soft best-of-n needs a temperature > 0; got {temperature} (use best-of-n for 0)")
    return torch.multinomial(torch.softmax(rewards / temperature, dim=-1), 1, generator=generator)[:, 0]


def run_candidates(
    backend,
    reward,
    prompts: list,
    prompt_ids: list,
    columns: dict,
    params: SamplingParams,
    seed: int,
    strategy: str,
    pick,
) -> StrategyResult:
    """Sample params.n candidates per prompt, score them all, keep `pick(rewards [P, N]) -> [P]`."""
    start = time.perf_counter()
    samples = backend.sample(prompt_ids, params, seed)
    rewards, _ = score_groups(reward, prompts, [[s.text for s in group] for group in samples], columns)
    chosen = pick(rewards)
    choices = []
    for i, group in enumerate(samples):
        k = int(chosen[i])
        choices.append(
            Choice(
                group[k].text,
                float(rewards[i, k]),
                [s.text for s in group],
                rewards[i].tolist(),
                k,
                sum(len(s.token_ids) for s in group),
            )
        )
    return StrategyResult(strategy, choices, time.perf_counter() - start, sum(len(p) for p in prompt_ids))


def sample_once(backend, reward, prompts, prompt_ids, columns, params: SamplingParams, seed: int = 0):
    p = params.but(n=1)
    out = run_candidates(
        backend,
        reward,
        prompts,
        prompt_ids,
        columns,
        p,
        seed,
        "sample",
        lambda r: torch.zeros(r.shape[0], dtype=torch.long),
    )
    out.kl, out.kl_kind = 0.0, "exact"
    return out


def best_of_n(backend, reward, prompts, prompt_ids, columns, params: SamplingParams, seed: int = 0):
    out = run_candidates(
        backend, reward, prompts, prompt_ids, columns, params, seed, "best-of-n", lambda r: r.argmax(dim=-1)
    )
    out.kl, out.kl_kind = best_of_n_kl_bound(params.n), "bound"
    out.info = {"n": params.n}
    return out


def soft_best_of_n(
    backend, reward, prompts, prompt_ids, columns, params: SamplingParams, seed: int = 0, temperature: float = 0.1
):
    g = torch.Generator().manual_seed(seed)
    out = run_candidates(
        backend,
        reward,
        prompts,
        prompt_ids,
        columns,
        params,
        seed,
        "soft-best-of-n",
        lambda r: select_soft(r, temperature, g),
    )
    out.kl, out.kl_kind = math.log(params.n), "bound"
    out.info = {"n": params.n, "soft_temperature": temperature}
    return out
