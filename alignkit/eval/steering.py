"""Steering vectors from preference pairs, the strength sweep and the representation section of
`alignkit eval` (issue 20; Representation Engineering, Zou et al., arXiv 2310.01405; "Tradeoffs
Between Alignment and Helpfulness in Language Models with Representation Engineering", Wolf et
al., arXiv 2401.16332).

- `fit_from_pairs`: hidden states of the chosen and rejected replies (mean over the reply's
  tokens) at the chosen layers, directions fitted on the training pairs, and how well each layer's
  direction separates held-out pairs (paired accuracy, Fisher ratio).
- `steering_sweep`: for each strength s, an alignment measure, the steered model's mean log-prob
  margin log p(chosen) - log p(rejected) on the pairs (and its accuracy), and a helpfulness
  measure, the per-token NLL of reference answers; then the fits the paper predicts: alignment
  linear in s, helpfulness loss (NLL(s) - NLL(0)) quadratic in s, each with its R^2 (and the
  linear fit's R^2 of the helpfulness loss beside it, so the quadratic shape is tested, not assumed).
- `representation_section`: per layer, a logistic probe fitted on half of the pairs and its
  held-out paired accuracy, with the Fisher ratio: where in the network chosen and rejected
  differ.
"""

from __future__ import annotations

import numpy as np
import torch

from alignkit.errors import ConfigError
from alignkit.inference.steering import (check_strength, fit_directions, hidden_states, load_vectors,
                                         model_fingerprint, preference_items, separation, steer)


def _split(n: int, heldout_fraction: float) -> int:
    cut = int(round(n * (1 - heldout_fraction))) if 0 < heldout_fraction < 1 else 0
    if not 0 < cut < n:
        raise ConfigError(f"{n} pairs leave no training or held-out pairs at a held-out fraction of {heldout_fraction}: "
                          "give more pairs (--data, --limit) or a held-out fraction between 0 and 1 (--heldout-fraction)")
    return cut


def check_sweep(strengths, option: str = "strengths") -> list[float]:
    """The strengths of a sweep as floats, refused (ConfigError naming `option`) when there are none
    or one is not finite (see `check_strength`)."""
    values = [check_strength(s, option) for s in strengths]
    if not values:
        raise ConfigError(f"{option}: no strengths given; list the strengths to sweep, e.g. 0,1,2,4,8")
    return values


def fit_from_pairs(model, tokenizer, examples: list, layers, *, method: str = "mean_diff",
                   heldout_fraction: float = 0.2, batch_size: int = 8, progress: bool = False) -> tuple[dict, dict]:
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
    dirs, held = fit_from_pairs(model, tokenizer, examples, layers, method="probe", heldout_fraction=0.5,
                                batch_size=batch_size)
    ls = sorted(held)
    n_train = _split(len(examples), 0.5)
    return {"layers": ls, "probe_accuracy": [held[l]["accuracy"] for l in ls],
            "fisher": [held[l]["fisher"] for l in ls], "n_train": n_train, "n_heldout": len(examples) - n_train}


def _fit(x: np.ndarray, y: np.ndarray, degree: int) -> dict:
    coef = np.polyfit(x, y, degree)
    pred = np.polyval(coef, x)
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {"coef": [float(c) for c in coef], "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")}


def fits(strengths: list, alignment: list, helpfulness_loss: list) -> dict:
    """Least-squares fits (numpy.polyfit, highest power first): alignment = a s + b; helpfulness
    loss = c s^2 + d s + e, and = f s + g for comparison."""
    s = np.asarray(strengths, dtype=np.float64)
    return {"alignment_linear": _fit(s, np.asarray(alignment, dtype=np.float64), 1),
            "helpfulness_quadratic": _fit(s, np.asarray(helpfulness_loss, dtype=np.float64), 2),
            "helpfulness_linear": _fit(s, np.asarray(helpfulness_loss, dtype=np.float64), 1)}


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


def steering_sweep(model, tokenizer, steer_dir: str, strengths: list, examples: list, help_prompts: list,
                   help_answers: list, *, max_length: int = 1024, batch_size: int = 8,
                   positions: str = "all", progress: bool = False) -> dict:
    """The sweep (see the module docstring); the vectors are refused if made for another model."""
    from tqdm.auto import tqdm

    strengths = check_sweep(strengths)
    vectors, meta = load_vectors(steer_dir, model)
    rows = []
    for s in tqdm(strengths, desc="steering sweep", unit="strength", disable=not progress):
        with steer(model, vectors, float(s), positions):
            margins = _pair_margins(model, tokenizer, examples, max_length, batch_size)
            nll = _nll_per_token(model, tokenizer, help_prompts, help_answers, max_length, batch_size)
        rows.append({"strength": float(s), "margin": sum(margins) / len(margins),
                     "accuracy": sum(m > 0 for m in margins) / len(margins), "nll": nll})
    base = next((r["nll"] for r in rows if r["strength"] == 0.0), rows[0]["nll"])
    for r in rows:
        r["helpfulness_loss"] = r["nll"] - base
    return {"vectors": steer_dir, "method": meta.get("method"), "layers": meta.get("layers"), "positions": positions,
            "n_pairs": len(examples), "n_helpfulness": len(help_answers), "rows": rows,
            "fits": fits([r["strength"] for r in rows], [r["margin"] for r in rows],
                         [r["helpfulness_loss"] for r in rows]),
            "fingerprint": model_fingerprint(model)}
