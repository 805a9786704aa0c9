"""`alignkit data steps`: label the steps of solutions automatically, in the manner of Math-Shepherd
(Wang et al., "Math-Shepherd: Verify and Reinforce LLMs Step-by-step without Human Annotations",
arXiv 2312.08935, Sec. 3.3).

A step's quality is its potential to reach the right answer: from the prefix that ends with step
i, a completer samples N continuations; the hard label is 1 when any reaches the verified answer,
the soft label the share that do (the paper's HE and SE). The last step's continuation is the
solution itself, so its label is whether the solution's answer is right. Records without steps
get a solution sampled first (`solutions` per prompt), split at the separator.

The records written are what `recipe: prm` reads: `{prompt, steps, labels, soft, hard, answer,
solution_correct}` (`labels` is the kind `--label` chose).
"""

from __future__ import annotations

from alignkit.data.steps import split_steps


def continuation_prompt(tokenizer, prompt, steps: list, separator: str) -> str:
    """The raw text a completer continues: the prompt through the chat template with the
    generation prompt, then the steps so far and the separator (the reply's start, as written)."""
    from alignkit.data.tokenize import as_messages, render_prompt

    messages, plain = as_messages(prompt)
    return render_prompt(tokenizer, messages, plain) + separator.join(steps) + separator


def label_steps(
    lm, tokenizer, items: list, verifier, params, *, rollouts: int, separator: str, seed: int
) -> list[dict]:
    """`items`: {prompt, steps, columns} (columns: what the verifier reads, e.g. `answer`). Returns
    one record per item with the hard and soft label of each step. All prefixes of all items are
    sampled in one call (`rollouts` continuations each), so a local model batches them."""
    prefixes = [(k, i) for k, it in enumerate(items) for i in range(len(it["steps"]) - 1)]
    texts = [
        continuation_prompt(tokenizer, items[k]["prompt"], items[k]["steps"][: i + 1], separator) for k, i in prefixes
    ]
    outs = lm.complete(texts, params.but(n=rollouts), seed=seed) if texts else []
    # each continuation is judged as the whole reply it completes
    replies, owners = [], []
    for (k, i), conts in zip(prefixes, outs):
        head = separator.join(items[k]["steps"][: i + 1]) + separator
        replies += [head + c for c in conts]
        owners += [(k, i)] * len(conts)
    finals = [separator.join(it["steps"]) for it in items]
    right = _verify(
        verifier,
        [items[k]["prompt"] for k, _ in owners] + [it["prompt"] for it in items],
        replies + finals,
        [items[k]["columns"] for k, _ in owners] + [it["columns"] for it in items],
    )
    hits: dict = {}
    for (k, i), ok in zip(owners, right[: len(owners)]):
        hits.setdefault((k, i), []).append(ok)
    records = []
    for k, it in enumerate(items):
        soft = [sum(hits.get((k, i), [])) / max(len(hits.get((k, i), [])), 1) for i in range(len(it["steps"]) - 1)]
        correct = right[len(owners) + k]
        soft.append(1.0 if correct else 0.0)
        records.append(
            {
                "prompt": it["prompt"],
                "steps": list(it["steps"]),
                "soft": soft,
                "hard": [1.0 if s > 0 else 0.0 for s in soft],
                "solution_correct": bool(correct),
                **it["columns"],
            }
        )
    return records


def _verify(verifier, prompts: list, replies: list, columns: list) -> list[bool]:
    """Whether each reply reaches its verified answer (the verifier's score > 0), scored as every
    reward is (`score_ragged`: the answer after any reasoning block)."""
    from alignkit.rewards.functions import score_ragged

    keys = sorted({key for c in columns for key in c})
    scores, _ = score_ragged(verifier, prompts, [[r] for r in replies], {k: [c.get(k) for c in columns] for k in keys})
    return [s > 0 for (s,) in scores]


def solution_steps(text: str, separator: str) -> list[str]:
    """A sampled solution's steps (at least one: a reply without a separator is one step)."""
    return split_steps(text, separator) or [text.strip() or "(empty)"]
