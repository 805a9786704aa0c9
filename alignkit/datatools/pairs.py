"""Preference pairs from scored samples: the data step of iterative DPO, RAFT and UltraFeedback-style sets.

Sample k replies per prompt, score each with a reward (a reward model, a verifiable check, a
judge), and keep the best and the worst as (chosen, rejected). This is how iterative DPO builds
each round's data from the current policy (Xiong et al., "Iterative Preference Learning from Human
Feedback", arXiv 2312.11456: best-of-n against worst-of-n); UltraFeedback (Cui et al., arXiv
2310.01377) rates several replies per prompt in the same way, and its binarised form takes the
highest-rated reply as chosen (Zephyr, arXiv 2310.16944); keeping only `chosen` gives RAFT's
reward-ranked fine-tuning data (Dong et al., arXiv 2304.06767).

    samples, scores = sample_and_score(lm, prompts, k=8, params=SamplingParams(temperature=0.8),
                                       reward=build_reward("numeric_match"), columns={"answer": answers})
    records, counts = build_pairs(prompts, samples, scores, min_margin=0.5)
    write_pairs("pairs.jsonl", records)   # loads with alignkit's paired reader (`data.path` of a DPO run)
"""

from __future__ import annotations

import math
from pathlib import Path

from alignkit.jsonfile import dumps

COUNT_KEYS = ("prompts", "pairs", "below_margin", "too_few_distinct", "blank_samples")


def build_pairs(
    prompts: list, samples: list[list[str]], scores: list[list[float]], *, min_margin: float
) -> tuple[list[dict], dict]:
    """One {"prompt", "chosen", "rejected", "margin"} record per prompt whose best and worst samples
    differ by at least `min_margin`; and counts of what happened to every prompt.

    chosen is the highest-scoring sample, rejected the lowest-scoring one whose text differs from
    chosen (a text sampled twice cannot be both); ties go to the first index, so the result does not
    depend on anything but the order of the samples. margin = score(chosen) - score(rejected).

    Skipped, and counted: prompts with fewer than 2 distinct non-blank samples (`too_few_distinct`:
    there is no pair to make) and prompts whose margin is below `min_margin` (`below_margin`: the
    reward cannot tell the replies apart, and such pairs mostly teach the reward's noise). Blank
    samples (only whitespace) are never chosen or rejected, since the paired format has no empty
    reply; `blank_samples` counts them (samples, not prompts). The prompt is written as given, a
    string or a message list; both are forms the paired reader (`alignkit.data.formats`) accepts.
    """
    if not (
        isinstance(min_margin, (int, float))
        and not isinstance(min_margin, bool)
        and math.isfinite(min_margin)
        and min_margin >= 0
    ):
        raise ValueError(f"build_pairs: min_margin must be a finite number >= 0; got {min_margin!r}")
    if not len(prompts) == len(samples) == len(scores):
        raise ValueError(
            f"build_pairs: {len(prompts)} prompts, {len(samples)} sample lists and {len(scores)} score "
            "lists; give one sample list and one score list per prompt"
        )
    records, counts = [], dict.fromkeys(COUNT_KEYS, 0)
    for i, (prompt, texts, values) in enumerate(zip(prompts, samples, scores)):
        counts["prompts"] += 1
        usable = _usable(texts, values, i)
        counts["blank_samples"] += len(texts) - len(usable)
        if len({t for t, _ in usable}) < 2:
            counts["too_few_distinct"] += 1
            continue
        chosen, best = max(usable, key=lambda u: u[1])  # max/min keep the first of equal items
        rejected, worst = min((u for u in usable if u[0] != chosen), key=lambda u: u[1])
        if best - worst < min_margin:
            counts["below_margin"] += 1
            continue
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": best - worst})
        counts["pairs"] += 1
    return records, counts


def _usable(texts: list, values: list, i: int) -> list[tuple[str, float]]:
    """(text, score) of prompt i's non-blank samples, in order; mistakes named by prompt and sample."""
    if len(texts) != len(values):
        raise ValueError(f"build_pairs: prompt {i} has {len(texts)} samples but {len(values)} scores")
    out = []
    for j, (text, value) in enumerate(zip(texts, values)):
        if not isinstance(text, str):
            raise TypeError(f"build_pairs: sample {j} of prompt {i} is {type(text).__name__}, not a string")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"build_pairs: score {j} of prompt {i} is {value!r}; scores must be finite numbers "
                "(give a failed sample a low score instead)"
            )
        if text.strip():
            out.append((text, float(value)))
    return out


def sample_and_score(
    lm, prompts: list, k: int, params, reward, seed: int = 0, *, columns: dict | None = None, progress: bool = False
) -> tuple[list[list[str]], list[list[float]]]:
    """k replies per prompt from `lm.chat` (a `TextModel`; `params.n` is set to k) and their rewards.

    `prompts`: strings (sent as one user message) or message lists. `reward`: a reward callable,
    `reward(prompts, completions, **columns)`, called once over all prompts x k replies with each
    prompt as given; `columns`: per-prompt lists (e.g. {"answer": [...]} for `numeric_match`),
    repeated for each of a prompt's replies."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"sample_and_score: k must be a whole number >= 1 (replies per prompt); got {k!r}")
    columns = dict(columns or {})
    for key, values in columns.items():
        if len(values) != len(prompts):
            raise ValueError(f"sample_and_score: column {key!r} has {len(values)} values for {len(prompts)} prompts")
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    samples = [list(replies) for replies in lm.chat(conversations, params.but(n=k), seed=seed, progress=progress)]
    for i, replies in enumerate(samples):
        if len(replies) != k:
            raise ValueError(f"sample_and_score: the model returned {len(replies)} replies for prompt {i}, not {k}")
    flat = [reply for replies in samples for reply in replies]
    repeated = {key: [v for v in values for _ in range(k)] for key, values in columns.items()}
    values = list(reward([p for p in prompts for _ in range(k)], flat, **repeated))
    if len(values) != len(flat):
        raise ValueError(
            f"sample_and_score: reward {getattr(reward, 'name', reward)!r} returned {len(values)} "
            f"values for {len(flat)} replies"
        )
    return samples, [[float(v) for v in values[i * k : (i + 1) * k]] for i in range(len(prompts))]


def write_pairs(path, records: list[dict]) -> Path:
    """Write records as JSONL (strict JSON, one record a line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(dumps(record, ensure_ascii=False) + "\n" for record in records)
    return path
