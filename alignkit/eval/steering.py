"""Steering vectors from preference pairs, the strength sweep and the representation section of
`alignkit eval` (issue 20; Representation Engineering, Zou et al., arXiv 2310.01405; "Tradeoffs
Between Alignment and Helpfulness in Language Models with Representation Engineering", Wolf et
al., arXiv 2401.16332).

- `fit_from_pairs`: hidden states of the chosen and rejected replies (mean over the reply's
  tokens) at the chosen layers, directions fitted on the training pairs, and how well each layer's
  direction separates held-out pairs (paired accuracy, Fisher ratio).
- `steering_sweep`: for each strength s (both signs, fine steps near 0: `PAPER_SWEEP`), the
  quantities Wolf et al. measure: a behaviour rate in [-1, 1] from *sampled* replies to harmful
  prompts (refusals minus compliances, judged by a named `RefusalJudge`, the rule by default), and
  helpfulness as accuracy on questions with known answers (multiple choice from log-probs, or a
  greedy reply's final answer). Their functional forms are fitted, tanh for the behaviour and
  h0 / (1 + k s^2) for the accuracy, each with its R^2 beside a line and an unconstrained quadratic,
  so the asymmetry the paper predicts (behaviour saturating, helpfulness falling quadratically near
  0) is tested, not assumed. The teacher-forced margin log p(chosen) - log p(rejected) on pairs and
  the per-token NLL of reference answers stay available as secondary diagnostics. Strengths are
  relative (1 = each layer's fitted mean-difference length) or absolute norms; every row lists the
  absolute norm added at each layer.
- `representation_section`: per layer, a logistic probe fitted on half of the pairs and its
  held-out paired accuracy, with the Fisher ratio: where in the network chosen and rejected
  differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from alignkit.errors import ConfigError, DataError
from alignkit.inference.steering import (
    check_strength,
    fit_directions,
    hidden_states,
    load_vectors,
    preference_items,
    separation,
    steer,
    steering_fingerprint,
)
from alignkit.rewards.refusal import RuleJudge


def _split(n: int, heldout_fraction: float) -> int:
    cut = int(round(n * (1 - heldout_fraction))) if 0 < heldout_fraction < 1 else 0
    if not 0 < cut < n:
        raise ConfigError(
            f"{n} pairs leave no training or held-out pairs at a held-out fraction of {heldout_fraction}: "
            "give more pairs (--data, --limit) or a held-out fraction between 0 and 1 (--heldout-fraction)"
        )
    return cut


def check_sweep(strengths, option: str = "strengths") -> list[float]:
    """The strengths of a sweep as floats, refused (ConfigError naming `option`) when there are none
    or one is not finite (see `check_strength`)."""
    values = [check_strength(s, option) for s in strengths]
    if not values:
        raise ConfigError(f"{option}: no strengths given; list the strengths to sweep, e.g. 0,1,2,4,8")
    return values


def fit_from_pairs(
    model,
    tokenizer,
    examples: list,
    layers,
    *,
    method: str = "mean_diff",
    heldout_fraction: float = 0.2,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[dict, dict]:
    """({layer: Direction} fitted on the first pairs, {layer: separation on the held-out pairs})."""
    chosen, rejected = preference_items(examples)
    pos = hidden_states(model, tokenizer, chosen, layers, position="mean", batch_size=batch_size, progress=progress)
    neg = hidden_states(model, tokenizer, rejected, layers, position="mean", batch_size=batch_size, progress=progress)
    cut = _split(len(examples), heldout_fraction)
    dirs = fit_directions({l: v[:cut] for l, v in pos.items()}, {l: v[:cut] for l, v in neg.items()}, method)
    held = {l: separation(d, pos[l][cut:], neg[l][cut:]) for l, d in dirs.items()}
    return dirs, held


def representation_section(model, tokenizer, examples: list, layers, batch_size: int = 8) -> dict:
    """{"layers": [...], "probe_accuracy": [...], "fisher": [...], "n_train", "n_heldout"}: a probe
    per layer on half of the pairs, measured on the other half (0.5 is chance)."""
    dirs, held = fit_from_pairs(
        model, tokenizer, examples, layers, method="probe", heldout_fraction=0.5, batch_size=batch_size
    )
    ls = sorted(held)
    n_train = _split(len(examples), 0.5)
    return {
        "layers": ls,
        "probe_accuracy": [held[l]["accuracy"] for l in ls],
        "fisher": [held[l]["fisher"] for l in ls],
        "n_train": n_train,
        "n_heldout": len(examples) - n_train,
    }


def _fit(x: np.ndarray, y: np.ndarray, degree: int) -> dict:
    coef = np.polyfit(x, y, degree)
    pred = np.polyval(coef, x)
    return {"form": "line" if degree == 1 else "quadratic", "coef": [float(c) for c in coef], "r2": _r2(y, pred)}


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def _linear_ls(x: np.ndarray, y: np.ndarray, intercept: bool) -> tuple[np.ndarray, float]:
    """Least squares of y on x (and a constant): (coefficients, sum of squared residuals)."""
    a = np.stack([x, np.ones_like(x)], 1) if intercept else x[:, None]
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return coef, float(((a @ coef - y) ** 2).sum())


def fit_tanh(s: np.ndarray, y: np.ndarray) -> dict:
    """y ~ A tanh(k (s - s0)) + B, the shape Wolf et al. (arXiv 2401.16332) derive for a bounded
    behaviour rate under a steering norm s (linear only for small |s|): for each (k, s0) on a grid
    (k log-spaced over the sweep's scale, s0 across its range) A and B are the least-squares
    solution, and the best grid point is kept."""
    scale = max(float(np.abs(s).max()), 1e-12)

    def sse(k, s0):
        (a, b), err = _linear_ls(np.tanh(k * (s - s0)), y, True)
        return err, float(a), float(b)

    logk, s0s = np.log(np.geomspace(1e-2, 1e2, 121) / scale), np.linspace(s.min(), s.max(), 41)
    best = min((sse(math.exp(lk), s0)[0], lk, s0) for lk in logk for s0 in s0s)
    dk, ds = logk[1] - logk[0], s0s[1] - s0s[0]
    for _ in range(6):  # refine around the best grid point, shrinking the neighbourhood each round
        best = min(
            (sse(math.exp(lk), s0)[0], lk, s0)
            for lk in np.linspace(best[1] - dk, best[1] + dk, 11)
            for s0 in np.linspace(best[2] - ds, best[2] + ds, 11)
        )
        dk, ds = dk / 5, ds / 5
    k, s0 = math.exp(best[1]), float(best[2])
    _, a, b = sse(k, s0)
    return {
        "form": "A tanh(k (s - s0)) + B",
        "A": a,
        "B": b,
        "k": k,
        "s0": s0,
        "r2": _r2(y, a * np.tanh(k * (s - s0)) + b),
    }


def fit_inverse_quadratic(s: np.ndarray, y: np.ndarray) -> dict:
    """y ~ h0 / (1 + k s^2), k >= 0: helpfulness (accuracy) decaying with the steering norm as
    Wolf et al. derive (quadratic only near 0); k on a log grid (and 0), h0 by least squares."""

    def sse(k):
        (h0,), err = _linear_ls(1.0 / (1.0 + k * s**2), y, False)
        return err, float(h0)

    top = max(float((s**2).max()), 1e-12)
    grid = np.geomspace(1e-6, 1e4, 401) / top
    err0 = sse(0.0)[0]
    i = int(np.argmin([sse(k)[0] for k in grid]))
    k = 0.0
    if sse(grid[i])[0] < err0:  # golden-section search on log k between the grid neighbours
        lo, hi = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, grid.size - 1)])
        g = (math.sqrt(5) - 1) / 2
        for _ in range(60):
            a, b = hi - g * (hi - lo), lo + g * (hi - lo)
            lo, hi = (lo, b) if sse(math.exp(a))[0] <= sse(math.exp(b))[0] else (a, hi)
        k = math.exp(0.5 * (lo + hi))
    h0 = sse(k)[1]
    return {"form": "h0 / (1 + k s^2)", "h0": h0, "k": k, "r2": _r2(y, h0 / (1.0 + k * s**2))}


# the parameters of each form: a sweep must have more distinct strengths than that for the form's
# R^2 to say anything (with as many, every curve of the form passes through every point; with
# fewer, the form is not determined and numpy.polyfit warns that it is poorly conditioned)
PARAMETERS = {"line": 2, "quadratic": 3, "inverse_quadratic": 2, "tanh": 4}


def fits(strengths: list, values: list, paper: str) -> dict:
    """The paper's form (`tanh` for a behaviour rate, `inverse_quadratic` for helpfulness) beside a
    line and an unconstrained quadratic (numpy.polyfit, highest power first), each with its R^2;
    only the forms with fewer parameters than the sweep has distinct strengths (`unfitted`)."""
    s, y = np.asarray(strengths, dtype=np.float64), np.asarray(values, dtype=np.float64)
    forms = {"line": lambda: _fit(s, y, 1), "quadratic": lambda: _fit(s, y, 2)}
    if paper == "tanh":
        forms["tanh"] = lambda: fit_tanh(s, y)
    elif paper == "inverse_quadratic":
        forms["inverse_quadratic"] = lambda: fit_inverse_quadratic(s, y)
    return {name: fit() for name, fit in forms.items() if _determined(name, strengths)}


def _determined(form: str, strengths: list) -> bool:
    return len(set(strengths)) > PARAMETERS[form]


def unfitted(strengths: list, forms: list) -> str | None:
    """Which of `forms` a sweep of these strengths leaves unfitted (`fits`), as a note; None: none."""
    n = len(set(strengths))
    short = [f"{name} ({PARAMETERS[name]} parameters)" for name in forms if not _determined(name, strengths)]
    if not short:
        return None
    need = max(PARAMETERS[name] for name in forms) + 1
    return (
        f"the steering sweep has {n} distinct strengths, so {', '.join(short)} "
        f"{'is' if len(short) == 1 else 'are'} not fitted: a form needs more strengths than parameters "
        f"(give at least {need}, or --steer-sweep paper)"
    )


@torch.no_grad()
def _pair_margins(model, tokenizer, examples: list, max_length: int, batch_size: int) -> list:
    from alignkit.logprob_passes import sample_logps

    prompts = [list(e.prompt) for e in examples]
    text = lambda side: side[-1]["content"]  # noqa: E731
    lc = sample_logps(model, tokenizer, prompts, [text(e.chosen) for e in examples], max_length, batch_size)
    lr = sample_logps(model, tokenizer, prompts, [text(e.rejected) for e in examples], max_length, batch_size)
    return [float(c - r) for c, r in zip(lc, lr)]


@torch.no_grad()
def _nll_per_token(model, tokenizer, prompts: list, answers: list, max_length: int, batch_size: int) -> float:
    from alignkit.logprob_passes import sample_logps

    logps = sample_logps(model, tokenizer, prompts, answers, max_length, batch_size)
    # sample_logps scores at most the first max_length // 2 tokens of each answer: count those
    tokens = [min(len(tokenizer(a, add_special_tokens=False)["input_ids"]), max_length // 2) for a in answers]
    return float(-sum(float(x) for x in logps) / max(sum(tokens), 1))


@dataclass
class QuestionItem:
    """A question with a known answer: `choices` (scored from log-probs) or a free reply whose final
    answer (last number, else the stripped text) must equal `answer`."""

    prompt: list
    answer: str
    choices: list | None = None


def load_questions(path: str, limit: int | None = None) -> list:
    """Records `{"prompt" | "question": ..., "answer": ...}` (GSM8K's `#### n` answers read as n), or
    with `"choices": [...]` and `answer` as the right choice (its text or its index)."""
    from alignkit.data.readers import read_records
    from alignkit.rewards.verifiable import final_answer

    items = []
    for where, rec in read_records(path):
        q = rec.get("prompt", rec.get("question"))
        if isinstance(q, str):
            q = [{"role": "user", "content": q}]
        if not isinstance(q, list) or not q or "answer" not in rec:
            raise DataError(f"{where}: a question record needs `prompt` (or `question`) and `answer`.")
        choices, answer = rec.get("choices"), rec["answer"]
        if choices is not None:
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise DataError(f"{where}: `choices` must be a list of at least two strings.")
            if isinstance(answer, int) and not isinstance(answer, bool):
                if not 0 <= answer < len(choices):
                    raise DataError(f"{where}: `answer` {answer} is not an index of its {len(choices)} choices.")
                answer = choices[answer]
            if answer not in choices:
                raise DataError(f"{where}: `answer` {answer!r} is not one of `choices`.")
        else:
            text = str(answer)
            answer = final_answer(text.split("####")[-1]) or text.strip()
        items.append(QuestionItem(q, str(answer), choices))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise DataError(f"{path}: no question records.")
    return items


@torch.no_grad()
def question_accuracy(model, tokenizer, items: list, params, max_length: int, batch_size: int, seed: int) -> float:
    """Share of `items` answered right: multiple choice by the highest summed log-prob of a choice
    as the reply; free questions by a greedy reply's final answer."""
    from alignkit.generation.hf import generate
    from alignkit.logprob_passes import sample_logps
    from alignkit.rewards.verifiable import final_answer

    right = 0
    mc = [it for it in items if it.choices]
    if mc:
        prompts = [it.prompt for it in mc for _ in it.choices]
        logps = sample_logps(model, tokenizer, prompts, [c for it in mc for c in it.choices], max_length, batch_size)
        start = 0
        for it in mc:
            scores = [float(x) for x in logps[start : start + len(it.choices)]]
            start += len(it.choices)
            right += it.choices[int(np.argmax(scores))] == it.answer
    free = [it for it in items if not it.choices]
    if free:
        replies = generate(
            model,
            tokenizer,
            [it.prompt for it in free],
            params.but(n=1, temperature=0.0),
            batch_size=batch_size,
            seed=seed,
        )
        for it, (reply,) in zip(free, replies):
            got = final_answer(reply)
            right += (got if got is not None else reply.strip()) == it.answer
    return right / len(items)


def _behaviour(model, tokenizer, prompts: list, judge, params, batch_size: int, seed: int) -> dict:
    """Sampled replies to (harmful) prompts, judged: refusal and compliance shares and their
    difference, the behaviour rate in [-1, 1], with a bootstrap interval over prompts."""
    from alignkit.eval.metrics import bootstrap_mean_ci
    from alignkit.generation.hf import generate
    from alignkit.rewards.refusal import behaviour_rate

    replies = [g[0] for g in generate(model, tokenizer, prompts, params.but(n=1), batch_size=batch_size, seed=seed)]
    labels = judge.classify(prompts, replies)
    m, lo, hi = bootstrap_mean_ci([1.0 if x == "refusal" else -1.0 for x in labels])
    return {
        "behaviour": behaviour_rate(labels),
        "behaviour_ci95": [lo, hi],
        "refusal_rate": labels.count("refusal") / len(labels),
        "example_reply": replies[0],
    }


def unit_vectors(vectors: dict) -> dict:
    """The vectors scaled to norm 1 (`norm: absolute`: strength s adds a vector of norm s)."""
    return {l: v / v.norm().clamp_min(1e-12) for l, v in vectors.items()}


PAPER_SWEEP = (-8.0, -4.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def steering_sweep(
    model,
    tokenizer,
    steer_dir: str,
    strengths: list,
    *,
    norm: str = "relative",
    behaviour_prompts: list | None = None,
    judge=None,
    questions: list | None = None,
    pairs: list | None = None,
    help_prompts: list | None = None,
    help_answers: list | None = None,
    params=None,
    max_length: int = 1024,
    batch_size: int = 8,
    positions: str = "all",
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """The sweep (see the module docstring); the vectors are refused if made for another model.

    `norm`: "relative" (strength 1 adds each layer's fitted vector, one mean-difference length,
    which differs by layer) or "absolute" (strength s adds a vector of norm s at every layer); each
    row lists the absolute norm added at each layer either way."""
    from tqdm.auto import tqdm

    from alignkit.generation.hf import SamplingParams

    strengths = check_sweep(strengths)
    if norm not in ("relative", "absolute"):
        raise ConfigError(f"steering norm {norm!r}: use relative or absolute")
    if not (behaviour_prompts or questions or pairs or help_answers):
        raise ConfigError(
            "a steering sweep needs something to measure: harmful prompts (--behaviour-prompts), "
            "questions with known answers (--accuracy), preference pairs (--data) or reference "
            "answers (--helpfulness)."
        )
    params = params or SamplingParams(max_new_tokens=64, temperature=1.0)
    vectors, meta = load_vectors(steer_dir, model)
    if norm == "absolute":
        vectors = unit_vectors(vectors)
    judge = judge or RuleJudge()
    rows = []
    for s in tqdm(strengths, desc="steering sweep", unit="strength", disable=not progress):
        row = {
            "strength": float(s),
            "norm_by_layer": {str(l): abs(float(s)) * float(v.norm()) for l, v in vectors.items()},
        }
        with steer(model, vectors, float(s), positions):
            if behaviour_prompts:
                row.update(_behaviour(model, tokenizer, behaviour_prompts, judge, params, batch_size, seed))
            if questions:
                row["accuracy"] = question_accuracy(model, tokenizer, questions, params, max_length, batch_size, seed)
            if pairs:
                margins = _pair_margins(model, tokenizer, pairs, max_length, batch_size)
                row.update(margin=sum(margins) / len(margins), pair_accuracy=sum(m > 0 for m in margins) / len(margins))
            if help_answers:
                row["nll"] = _nll_per_token(model, tokenizer, help_prompts, help_answers, max_length, batch_size)
        rows.append(row)
    xs = [r["strength"] for r in rows]
    forms = ["line", "quadratic"] + ["tanh"] * bool(behaviour_prompts) + ["inverse_quadratic"] * bool(questions)
    note = unfitted(xs, forms)
    if note:
        print(f"alignkit: {note}", flush=True)
    out_fits = {}
    if behaviour_prompts:
        out_fits["behaviour"] = fits(xs, [r["behaviour"] for r in rows], "tanh")
    if questions:
        out_fits["accuracy"] = fits(xs, [r["accuracy"] for r in rows], "inverse_quadratic")
    if pairs:  # secondary diagnostics: teacher-forced, unbounded
        out_fits["margin"] = fits(xs, [r["margin"] for r in rows], "")
    if help_answers:
        base = next((r["nll"] for r in rows if r["strength"] == 0.0), rows[0]["nll"])
        for r in rows:
            r["helpfulness_loss"] = r["nll"] - base
        out_fits["helpfulness_loss"] = fits(xs, [r["helpfulness_loss"] for r in rows], "")
    return {
        "vectors": steer_dir,
        "method": meta.get("method"),
        "layers": meta.get("layers"),
        "positions": positions,
        "norm": norm,
        "judge": judge.name if behaviour_prompts else None,
        "n_behaviour_prompts": len(behaviour_prompts or []),
        "n_questions": len(questions or []),
        "n_pairs": len(pairs or []),
        "n_helpfulness": len(help_answers or []),
        "rows": rows,
        "fits": out_fits,
        "unfitted": note,
        "fingerprint": steering_fingerprint(model),
    }
