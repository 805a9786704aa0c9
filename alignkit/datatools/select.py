"""Pick a small, good and varied subset of instruction data, as Deita does.

Deita (Liu et al., "What Makes Good Data for Alignment? A Comprehensive Study of Automatic Data
Selection in Instruction Tuning", arXiv 2312.15685) scores every example for complexity and quality,
multiplies the two ("evol score"), and walks down the examples from the best score, keeping one only
when it is not too close, in a sentence-embedding space, to one already kept (its "Repr Filter"),
until the budget is reached. Its finding: 6k examples chosen this way train as well as 10x more.

    c = complexity_score(lm, prompts)                 # 1..6, expected rating (see below)
    q = quality_score(reward, prompts, replies)        # any reward callable
    e = embed(model, tokenizer, prompts)               # [N, H], unit rows
    idx, counts = select(evol_score(c, q), e, budget=1000, min_distance=0.1)
    plot_scores([s for s in scores], [scores[i] for i in idx], "select.svg")

Departures, each written where it happens: complexity is asked of a general instruction-following
model instead of Deita's trained scorer; quality is any reward (a reward model, a principle judge)
instead of Deita's trained quality scorer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from alignkit.errors import AlignkitError
from alignkit.prompt_templates import fill_template

COMPLEXITY_TEMPLATE = """How complex is the following instruction to carry out well? Rate it from 1 to 6:
1 = trivial (one short step, common knowledge); 2 = simple; 3 = moderate; 4 = involved (several steps
or constraints); 5 = hard (many constraints, specialist knowledge or careful reasoning); 6 = very hard.

Instruction:
{instruction}

Answer with a single digit from 1 to 6."""

RATINGS = ("1", "2", "3", "4", "5", "6")


def complexity_score(lm, prompts: list, template: str | None = None) -> list[float]:
    """The expected complexity rating (1..6) of each instruction, read from `lm.option_logprobs`.

    Deita trains a complexity scorer (on ChatGPT's ranks of Evol-Instruct variants of seed
    instructions) and reads its score as the expected rating, sum_k k * p(k), with p the softmax
    over the logits of the tokens "1".."6". We keep that read-out but ask a general model with
    `COMPLEXITY_TEMPLATE` (`{instruction}`), as the paper's "Direct Scoring" baseline asks ChatGPT:
    no scorer to train, at the cost of a noisier score. The expectation, unlike the most likely
    digit, is graded (no ties between most examples) and needs no parsing of generated text.

    Options that the model does not rank at all (an endpoint reports only its top first tokens)
    get probability 0; when none of the six is ranked, that is an error naming the prompt."""
    tpl = COMPLEXITY_TEMPLATE if template is None else template
    convs = [
        [
            {
                "role": "user",
                "content": fill_template(tpl, "complexity_score: `template`", instruction=_instruction(p, i)),
            }
        ]
        for i, p in enumerate(prompts)
    ]
    if not convs:
        return []
    rows = lm.option_logprobs(convs, list(RATINGS))
    if len(rows) != len(convs):
        raise AlignkitError(f"complexity_score: the model returned {len(rows)} rows for {len(convs)} prompts.")
    return [expected_rating(row, i) for i, row in enumerate(rows)]


def expected_rating(logprobs: list, index: int = 0) -> float:
    """sum_k k * softmax(logprobs)_k for ratings k = 1, 2, ... (one log-prob per rating)."""
    lps = [float(x) for x in logprobs]
    top = max(lps)
    if math.isnan(top) or any(math.isnan(x) for x in lps) or top == -math.inf:
        raise AlignkitError(
            f"complexity_score: prompt {index}: the model gives none of the ratings 1-6 a "
            f"probability ({lps}); use a model that follows instructions, or a template that asks "
            "for a single digit."
        )
    weights = [math.exp(x - top) for x in lps]
    return sum(k * w for k, w in enumerate(weights, 1)) / sum(weights)


def _instruction(prompt, index: int) -> str:
    """A prompt's instruction: the text itself, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise AlignkitError(f"select: prompt {index} has no user message; give text or a message list with one.")
    return str(users[-1]["content"])


def quality_score(reward, prompts: list, completions: list, **columns) -> list[float]:
    """`reward(prompts, completions, **columns)` as floats, checked: one finite number per example.

    Deita trains a quality scorer (1..6) as it does for complexity; any reward callable takes its
    place here (`alignkit.rewards.build.build_reward`: a reward model, a principle judge, a function)."""
    scores = [float(x) for x in reward(prompts, completions, **columns)]
    if len(scores) != len(prompts):
        raise AlignkitError(f"quality_score: the reward returned {len(scores)} scores for {len(prompts)} examples.")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise AlignkitError(f"quality_score: the reward gave non-finite scores for examples {bad[:10]}.")
    return scores


def evol_score(complexity: list[float], quality: list[float]) -> list[float]:
    """Deita's combined score: complexity x quality per example.

    A product ranks sensibly only when both factors are positive (a negative quality would turn a
    more complex example into a worse one), so negative or zero scores are an error: map a reward
    that can be negative to a positive scale first (e.g. a sigmoid, or its rank)."""
    if len(complexity) != len(quality):
        raise ValueError(f"evol_score: {len(complexity)} complexity scores but {len(quality)} quality scores.")
    for name, values in (("complexity", complexity), ("quality", quality)):
        bad = [i for i, v in enumerate(values) if not (v > 0 and math.isfinite(v))]
        if bad:
            raise ValueError(
                f"evol_score: {name} scores must be positive and finite (they are multiplied); examples "
                f"{bad[:10]} are not. Map them to a positive scale first, e.g. a sigmoid or their rank."
            )
    return [float(c) * float(q) for c, q in zip(complexity, quality)]


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch_size: int = 16, *, max_length: int | None = None) -> torch.Tensor:
    """[N, H] float32 embeddings on the CPU: the mean of the last hidden states over each text's
    tokens, scaled to unit length.

    Deita embeds examples with a causal LM's hidden states (LLaMA-13B) and compares them by cosine
    distance; mean pooling uses every token rather than the last one alone, which in a causal model
    leans towards the end of the text. Unit rows make a dot product the cosine similarity. The LM head
    is skipped (`model.base_model`), so no [B, T, V] logits are made. Texts are right-padded and
    batched by length (less padding); padded positions are masked out of the attention and the mean,
    so a text's vector does not depend on its batch. `max_length`: truncate longer texts (None: keep all).
    The model is put in eval mode for the pass (no dropout) and its mode restored afterwards."""
    if batch_size < 1:
        raise ValueError(f"embed: batch_size must be at least 1; got {batch_size}.")
    ids = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise AlignkitError(
                f"embed: text {i} is a {type(text).__name__}; give strings (e.g. the instruction text)."
            )
        enc = tokenizer(text, add_special_tokens=True, truncation=max_length is not None, max_length=max_length)
        if not enc["input_ids"]:
            raise AlignkitError(f"embed: text {i} ({text!r}) has no tokens; drop empty texts before embedding.")
        ids.append(enc["input_ids"])
    base = model.base_model
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out: any id will do
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    out = None
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(ids[i]) for i in rows)
            batch = torch.full((len(rows), width), pad, dtype=torch.long)  # [B, T]
            mask = torch.zeros_like(batch)
            for r, i in enumerate(rows):
                batch[r, : len(ids[i])], mask[r, : len(ids[i])] = torch.tensor(ids[i]), 1
            hidden = base(input_ids=batch.to(device), attention_mask=mask.to(device)).last_hidden_state  # [B, T, H]
            m = mask.to(device=device, dtype=torch.float32).unsqueeze(-1)  # [B, T, 1]
            mean = (hidden.float() * m).sum(1) / m.sum(1)  # [B, H]
            if out is None:
                out = torch.empty(len(ids), mean.shape[-1], dtype=torch.float32)
            out[rows] = torch.nn.functional.normalize(mean, dim=-1).cpu()
    finally:
        model.train(was_training)
    return out if out is not None else torch.empty(0, 0)


def select(scores: list[float], embeddings, budget: int, *, min_distance: float = 0.1) -> tuple[list[int], dict]:
    """Deita's score-first, diversity-aware greedy selection.

    Go down the examples from the highest score (equal scores: lower index first, so the result is
    deterministic); keep an example only when the cosine distance (1 - cosine similarity) to its
    nearest already-kept example is greater than `min_distance`; stop once `budget` are kept.
    Deita keeps an example when that similarity is below tau = 0.9, i.e. `min_distance=0.1` (the
    default). The embeddings are scaled to unit length here, so raw ones work too.

    Returns (indices, counts): the kept indices in the order they were kept (best score first), and
    {"selected": kept, "redundant": skipped as too close to a kept one, "not_reached": never looked
    at because the budget was filled first}."""
    n = len(scores)
    emb = torch.as_tensor(embeddings)
    if not emb.is_floating_point():
        emb = emb.double()
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"select: embeddings must be [N, H] with N = {n} (one row per score); got {tuple(emb.shape)}.")
    if not isinstance(budget, int) or budget < 0:
        raise ValueError(f"select: budget must be a whole number >= 0; got {budget!r}.")
    if not 0.0 <= min_distance <= 2.0:
        raise ValueError(f"select: min_distance is a cosine distance, between 0 and 2; got {min_distance}.")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(float(s))]
    if bad:
        raise ValueError(f"select: scores of examples {bad[:10]} are not finite numbers.")
    norms = emb.norm(dim=-1, keepdim=True)  # [N, 1]
    zero = (norms.squeeze(-1) == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"select: examples {zero[:10]} have all-zero embeddings, which have no direction to compare.")
    emb = emb / norms
    kept: list[int] = []
    chosen = emb.new_empty(min(budget, n), emb.shape[1])  # [budget, H] the kept rows
    redundant = considered = 0
    for i in sorted(range(n), key=lambda i: (-float(scores[i]), i)):
        if len(kept) == budget:
            break
        considered += 1
        if kept and 1.0 - float((chosen[: len(kept)] @ emb[i]).max()) <= min_distance:
            redundant += 1
            continue
        chosen[len(kept)] = emb[i]
        kept.append(i)
    return kept, {"selected": len(kept), "redundant": redundant, "not_reached": n - considered}


def plot_scores(
    before: list[float],
    after: list[float],
    path,
    *,
    label: str = "score",
    title: str = "Scores before and after selection",
) -> Path:
    """Write an SVG histogram of the scores of all examples (`before`) and of the selected ones
    (`after`) on the same bins, with counts and means in the legend; returns the path."""
    import numpy as np

    from alignkit.report.svg import EVAL, MUTED, new_figure, style, to_svg

    before = [float(x) for x in before]
    after = [float(x) for x in after]
    if not before:
        raise ValueError("plot_scores: no scores to plot (`before` is empty).")
    with style("select-scores"):
        fig, (ax,) = new_figure(1, width=6.0, height=3.2)
        bins = np.histogram_bin_edges(before + after, bins=min(30, max(5, int(math.sqrt(len(before))))))
        ax.hist(before, bins=bins, color=MUTED, alpha=0.45, label=f"all (n={len(before)}, mean {np.mean(before):.3g})")
        if after:
            ax.hist(
                after, bins=bins, color=EVAL, alpha=0.8, label=f"selected (n={len(after)}, mean {np.mean(after):.3g})"
            )
        ax.set_xlabel(label)
        ax.set_ylabel("examples")
        ax.set_title(title)
        ax.legend()
        svg = to_svg(fig, "select-scores")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(svg + "\n", encoding="utf-8")
    return out
