"""A prefix value estimate for controlled decoding: V(x, y_<=t) ~ E[r(x, y) | x, y_<=t].

Controlled decoding (Mudgal et al. 2024, arXiv 2310.17022) steers a frozen model with a prefix
scorer trained on the model's own samples. We fit the CD-FUDGE form: sample completions of
training prompts from the model, score each with the reward, and regress every prefix's final
hidden state (the model's own, so decoding gets it for free) onto the completion's reward, a
linear head fitted in closed form by ridge regression, its penalty chosen from a grid by the fit
on a held-out fifth of the completions (then refitted on all of them). Rewards are standardised first (mean and
standard deviation over the samples), so the value is in standard deviations of the reward and
controlled decoding's strength means the same for any reward. Each completion weighs the same however
long it is. The held-out fit (R^2 over prefixes) is reported, so a user can see whether the value
carries signal before decoding with it.

Saved as `value_head.safetensors` (weight [H], bias) plus `value_head.json` (model, reward,
fit statistics), and refused for a model of another hidden size.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alignkit.errors import ConfigError
from alignkit.generation.decode import SamplingParams, sample
from alignkit.models import backbone_and_head
from alignkit.rewards.functions import score_ragged


@dataclass
class ValueHead:
    weight: torch.Tensor  # [H] float32
    bias: float
    meta: dict

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] final hidden states -> [...] values."""
        return hidden.float() @ self.weight.to(hidden.device) + self.bias

    def save(self, path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {"weight": self.weight.contiguous(), "bias": torch.tensor([self.bias])},
            str(path / "value_head.safetensors"),
        )
        (path / "value_head.json").write_text(json.dumps(self.meta, indent=2))
        return path

    @classmethod
    def load(cls, path, hidden_size: int | None = None) -> "ValueHead":
        path = Path(path)
        file = path / "value_head.safetensors"
        if not file.is_file():
            raise ConfigError(
                f"{path} holds no value head ({file.name} missing): fit one with "
                "`alignkit fit-value --model M --prompts P --reward R --output DIR`."
            )
        t = load_file(str(file))
        meta = json.loads((path / "value_head.json").read_text()) if (path / "value_head.json").is_file() else {}
        if hidden_size is not None and t["weight"].numel() != hidden_size:
            raise ConfigError(
                f"value head {path} was fitted on a model with hidden size {t['weight'].numel()} "
                f"({meta.get('model', '?')}); this model's is {hidden_size}. Fit one for this model."
            )
        return cls(t["weight"].float(), float(t["bias"][0]), meta)


@torch.no_grad()
def prefix_hidden(model, prompt_ids: list, completion_ids: list) -> torch.Tensor:
    """[len(completion), H] final hidden state after each completion token."""
    trunk, _ = backbone_and_head(model)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    h = trunk(input_ids=ids).last_hidden_state[0]
    return h[len(prompt_ids) :].float().cpu()


def ridge(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, l2: float) -> tuple[torch.Tensor, float]:
    """Weighted ridge regression with an unpenalised bias: min sum w (x.a + b - y)^2 + l2 |a|^2."""
    x, y, w = x.double(), y.double(), w.double()
    mx = (w[:, None] * x).sum(0) / w.sum()
    my = (w * y).sum() / w.sum()
    xc, yc = x - mx, y - my
    a = torch.linalg.solve(xc.T @ (w[:, None] * xc) + l2 * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ (w * yc))
    return a.float(), float(my - mx @ a)


def r_squared(pred: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float | None:
    """Weighted R^2; None when the targets do not vary (nothing to explain)."""
    my = (w * y).sum() / w.sum()
    total = (w * (y - my) ** 2).sum()
    if total <= 1e-12 * w.sum():
        return None
    return float(1 - (w * (y - pred) ** 2).sum() / total)


L2_GRID = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def fit_value_head(
    model,
    tokenizer,
    reward,
    prompts: list,
    prompt_ids: list,
    columns: dict,
    params: SamplingParams,
    *,
    l2: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    model_name: str = "",
    progress: bool = True,
) -> ValueHead:
    """Sample `params.n` completions per prompt, score them, and fit the head (module docstring);
    `l2` fixes the ridge penalty instead of choosing it from L2_GRID."""
    groups = sample(
        model,
        prompt_ids,
        params,
        eos_ids=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        batch_size=batch_size,
        seed=seed,
        tokenizer=tokenizer,
        progress=progress,
        desc="sampling (value)",
    )
    rewards, _ = score_ragged(reward, prompts, [[s.text for s in g] for g in groups], columns)
    flat = torch.tensor([r for rs in rewards for r in rs], dtype=torch.float64)
    mean, std = float(flat.mean()), float(flat.std()) if len(flat) > 1 else 0.0
    scale = std if std > 1e-12 else 1.0
    feats, targets, weights, which = [], [], [], []
    was = model.training
    model.eval()
    try:
        for i, (group, rs) in enumerate(tqdm(list(zip(groups, rewards)), desc="hidden states", disable=not progress)):
            for s, r in zip(group, rs):
                if not s.token_ids:
                    continue
                h = prefix_hidden(model, prompt_ids[i], s.token_ids)
                feats.append(h)
                targets.append(torch.full((len(h),), (r - mean) / scale))
                weights.append(torch.full((len(h),), 1.0 / len(h)))
                which.append(len(which))
    finally:
        model.train(was)
    if len(feats) < 5:
        raise ConfigError(
            f"fitting a value head needs at least 5 non-empty samples; got {len(feats)}. "
            "Give more prompts or a larger n."
        )
    held = set(range(0, len(feats), 5))  # every fifth completion is held out for the fit report
    parts = lambda keep: [
        torch.cat([t[j] for j in range(len(feats)) if (j in held) == keep]) for t in (feats, targets, weights)
    ]
    (xt, yt, wt), (xh, yh, wh) = parts(False), parts(True)
    fits = {}
    for penalty in [l2] if l2 is not None else L2_GRID:
        a, b = ridge(xt, yt, wt, penalty)
        fits[penalty] = r_squared(xh.double() @ a.double() + b, yh.double(), wh.double())
    l2 = max(fits, key=lambda k: -math.inf if fits[k] is None else fits[k])
    heldout_r2 = fits[l2]
    x, y, w = torch.cat(feats), torch.cat(targets), torch.cat(weights)
    a, b = ridge(x, y, w, l2)  # the saved head uses every completion
    meta = {
        "model": model_name,
        "hidden_size": int(x.shape[1]),
        "reward": repr(reward),
        "prompts": len(prompts),
        "completions": len(feats),
        "prefixes": int(x.shape[0]),
        "l2": l2,
        "heldout_r2": heldout_r2,
        "heldout_r2_by_l2": {str(k): v for k, v in fits.items()},
        "train_r2": r_squared(x.double() @ a.double() + b, y.double(), w.double()),
        "reward_mean": mean,
        "reward_std": std,
        "value_units": "standard deviations of the reward",
        "sampling": {"temperature": params.temperature, "max_new_tokens": params.max_new_tokens, "n": params.n},
        "date": datetime.date.today().isoformat(),
    }
    return ValueHead(a, b, meta)
