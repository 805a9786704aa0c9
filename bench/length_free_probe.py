"""What removing length costs a reward head on SmolLM2's frozen trunk: the best linear head with and
without the constraint that it be uncorrelated with reply length, on HH-RLHF harmless.

    python bench/length_free_probe.py [--train-rows 1000] [--max-length 256] [--folds 5]

ODIN's quality head (bench/reward_model_hh.py --odin) is a linear head on the frozen trunk's
outputs, trained by Adam next to a length head and pushed to be uncorrelated with length. This
script asks what such a head could reach at best, with no training noise: a logistic regression
(the Bradley-Terry loss of a linear head) on the same cached trunk outputs (the reward recipe's
own, `model.freeze_layers` = every block), once free and once constrained to be exactly
uncorrelated with the training replies' whole lengths. A linear head's rewards w.x correlate with
length in proportion to w.c, c the covariance of the features with length, so the constraint is
w.c = 0: the fit runs in the complement of c. L2 strength is chosen by k-fold cross-validation
inside the training pairs (the held-out pairs are read once, by the chosen models). Also the
accuracy of length alone (the shorter or the longer reply, whichever the training pairs prefer),
and with `--resplits N` the same comparison on N random train / held-out splits of all the pairs.

Data: as bench/reward_model_hh.py (its first 1000 rows train, the rest are held out). Last line:
`probe_acc=<a> length_free_acc=<b> probe_len_corr=<c> length_free_len_corr=<d> cv_probe=<e>
cv_length_free=<f> length_only_acc=<g> heldout_diff=<h>` (h: the length-free head's held-out
accuracy less the free one's, with a paired bootstrap interval in the line before). `--smoke`
(examples/smoke.py): the same on a tiny model and synthetic pairs, in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))
import hh_data  # noqa: E402
import smoke  # noqa: E402

L2_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def length_direction(feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[H] unit vector along the covariance of the replies' features [N, 2, H] with their lengths
    [N, 2]: a linear head's rewards are uncorrelated with length exactly when its weights are
    orthogonal to it."""
    x, n = feats.reshape(-1, feats.shape[-1]), lengths.reshape(-1).to(feats.dtype)
    c = ((x - x.mean(0)) * (n - n.mean())[:, None]).mean(0)
    return c / c.norm()


def fit(diffs: torch.Tensor, l2: float, away: torch.Tensor | None = None) -> torch.Tensor:
    """[H] the weights minimising the mean of softplus(-diffs @ w) + l2 |w|^2 (diffs: chosen's
    features less rejected's, [N, H]); with `away` (a unit vector), over the w orthogonal to it."""
    diffs = diffs if away is None else diffs - (diffs @ away)[:, None] * away  # the complement's coordinates
    w = torch.zeros(diffs.shape[1], dtype=diffs.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(diffs @ w)).mean() + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = w.detach()  # already orthogonal to `away` (every gradient is); made exact against round-off
    return w if away is None else w - (w @ away) * away


def correct(w: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """[N] 1.0 where the head ranks the preferred reply (the first) above the other."""
    return ((feats[:, 0] - feats[:, 1]) @ w > 0).double()


def accuracy(w: torch.Tensor, feats: torch.Tensor) -> float:
    return float(correct(w, feats).mean())


def cross_validate(feats: torch.Tensor, lengths: torch.Tensor, folds: int, length_free: bool) -> dict:
    """{l2: mean accuracy on the held-back fold} over `folds` interleaved folds."""
    fold = torch.arange(len(feats)) % folds
    trains = [fold != k for k in range(folds)]
    aways = [length_direction(feats[tr], lengths[tr]) if length_free else None for tr in trains]
    scores = {}
    for l2 in L2_GRID:
        accs = [accuracy(fit(feats[tr, 0] - feats[tr, 1], l2, away), feats[~tr]) for tr, away in zip(trains, aways)]
        scores[l2] = sum(accs) / folds
    return scores


def standardized(f_tr: torch.Tensor, f_ho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both scaled by the training replies' per-feature mean and spread, so that one L2 strength
    suits every feature."""
    x = f_tr.reshape(-1, f_tr.shape[-1])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    return (f_tr - mu) / sd, (f_ho - mu) / sd


def best_heads(f_tr: torch.Tensor, l_tr: torch.Tensor, folds: int) -> dict:
    """{"probe": ..., "length-free probe": ...}, each (weights, chosen L2, {L2: cross-validation
    accuracy}): the free and the length-free linear head, L2 chosen inside the training pairs."""
    heads = {}
    for name, length_free in (("probe", False), ("length-free probe", True)):
        scores = cross_validate(f_tr, l_tr, folds, length_free)
        l2 = max(scores, key=scores.get)
        away = length_direction(f_tr, l_tr) if length_free else None
        heads[name] = (fit(f_tr[:, 0] - f_tr[:, 1], l2, away), l2, scores)
    return heads


def resplit_costs(feats: torch.Tensor, lengths: torch.Tensor, n_train: int, folds: int, splits: int) -> list:
    """The length-free head's held-out accuracy less the free one's on `splits` random train /
    held-out splits of all the pairs (n_train of them train): how much of the result on the one
    fixed split is the split."""
    costs = []
    for seed in range(splits):
        perm = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))
        tr, ho = perm[:n_train], perm[n_train:]
        f_tr, f_ho = standardized(feats[tr], feats[ho])
        heads = best_heads(f_tr, lengths[tr], folds)
        costs.append(accuracy(heads["length-free probe"][0], f_ho) - accuracy(heads["probe"][0], f_ho))
        print(f"split {seed}: length-free less free {costs[-1]:+.3f}", flush=True)
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-rows", type=int, default=1000, help="rows 1..N train, the rest are held out")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument(
        "--resplits",
        type=int,
        default=0,
        help="also fit both heads on this many random train / held-out splits of all the pairs (same sizes)",
    )
    ap.add_argument("--out", default="runs/bench_length_free_probe")
    args = smoke.parse_args(ap, train_rows=40, max_length=64)
    out = ROOT / args.out
    hh = hh_data.smoke_hh(out, n=2 * args.train_rows) if args.smoke else hh_data.require_hh()

    from alignkit.config import load_config
    from alignkit.eval.metrics import bootstrap_mean_ci, wilson_interval
    from alignkit.losses.reward import pearson
    from alignkit.models import DEFAULT_MODEL
    from alignkit.train.session import setup

    start = time.perf_counter()
    model = smoke.tiny_model_dir(out) if args.smoke else DEFAULT_MODEL
    train_file, held_file, _, _, skipped = hh_data.write_split(out, args.train_rows, hh)
    print(f"HH-RLHF harmless: {len(skipped)} malformed rows skipped; the reward recipe's trunk outputs:", flush=True)
    from transformers import AutoConfig

    from alignkit.models import resolve_model_path

    blocks = AutoConfig.from_pretrained(resolve_model_path(model)).num_hidden_layers
    cfg = load_config(
        None,
        [
            "recipe=reward",
            f"model.name_or_path={model}",
            f"model.freeze_layers={blocks}",  # head only: the trunk's outputs are computed once and cached
            f"data.train={train_file}",
            f"data.eval={held_file}",
            f"data.max_length={args.max_length}",
            "train.eval_batch_size=16",
            "train.report_to=[]",
            f"output_dir={out / 'run'}",
        ],
    )
    session = setup(cfg, progress=True)
    recipe = session.recipe
    assert recipe.features, "expected the head-only mode's cached trunk outputs"

    def split(name: str, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, 2, H] features (preferred reply first) and [N, 2] whole reply lengths."""
        ids = torch.tensor([it.index for it in items])
        feats, lengths = recipe.features[name][ids].double(), recipe.lengths[name][ids].double()
        flip = recipe.labels[name][ids, 0] < 0
        return torch.where(flip[:, None, None], feats.flip(1), feats), torch.where(
            flip[:, None], lengths.flip(1), lengths
        )

    (raw_tr, l_tr), (raw_ho, l_ho) = split("train", session.data.train), split("eval", session.data.eval)
    f_tr, f_ho = standardized(raw_tr, raw_ho)
    n_ho = len(f_ho)

    shorter_wins = float((l_tr[:, 0] < l_tr[:, 1]).double().sum()) >= float((l_tr[:, 0] > l_tr[:, 1]).double().sum())
    sign = -1.0 if shorter_wins else 1.0
    differ = l_ho[:, 0] != l_ho[:, 1]
    length_only = (
        float((sign * (l_ho[differ, 0] - l_ho[differ, 1]) > 0).double().mean()) if differ.any() else float("nan")
    )

    results = {}
    for name, (w, l2, scores) in best_heads(f_tr, l_tr, args.folds).items():
        acc = accuracy(w, f_ho)
        lo, hi = wilson_interval(acc * n_ho, n_ho)
        rewards_tr = f_tr.reshape(-1, f_tr.shape[-1]) @ w
        r_tr = float(pearson(rewards_tr, l_tr.reshape(-1)))
        r_ho = float(pearson(f_ho.reshape(-1, f_ho.shape[-1]) @ w, l_ho.reshape(-1)))
        results[name] = (acc, lo, hi, r_ho, scores[l2], correct(w, f_ho).numpy())
        print(
            f"{name}: cross-validation accuracy by L2 "
            + ", ".join(f"{k:g}: {v:.3f}" for k, v in scores.items())
            + f"; chosen L2 {l2:g}; r(reward, length) on the training replies {r_tr:.3f}",
            flush=True,
        )
    print("\n| head | held-out accuracy [95% CI] | r(reward, length), held-out | cross-validation accuracy |")
    print("| --- | --- | --- | --- |")
    for name, (acc, lo, hi, r, cv, _) in results.items():
        print(f"| {name} | {acc:.3f} [{lo:.3f}, {hi:.3f}] | {r:.3f} | {cv:.3f} |")
    print(
        f"| length alone ({'shorter' if shorter_wins else 'longer'} wins; {int(differ.sum())} pairs whose lengths "
        f"differ) | {length_only:.3f} | | |"
    )
    (p, q) = results["probe"], results["length-free probe"]
    diff, d_lo, d_hi = bootstrap_mean_ci(q[5] - p[5])  # paired: the same held-out pairs
    print(
        f"length-free less free, held-out: {diff:+.3f} [{d_lo:+.3f}, {d_hi:+.3f}] (95% paired bootstrap); "
        f"cross-validation: {q[4] - p[4]:+.3f}"
    )
    if args.resplits:
        feats, lengths = torch.cat([raw_tr, raw_ho]), torch.cat([l_tr, l_ho])
        costs = torch.tensor(resplit_costs(feats, lengths, len(raw_tr), args.folds, args.resplits))
        print(
            f"length-free less free over {args.resplits} random splits ({len(raw_tr)} train, {n_ho} held out): "
            f"mean {float(costs.mean()):+.3f}, sd {float(costs.std()) if len(costs) > 1 else 0.0:.3f}, "
            f"range {float(costs.min()):+.3f}..{float(costs.max()):+.3f}, within 0.03 in "
            f"{int((costs >= -0.03).sum())} of {args.resplits}"
        )
    print(f"total {(time.perf_counter() - start) / 60:.1f} min")
    print(
        f"probe_acc={p[0]:.3f} length_free_acc={q[0]:.3f} probe_len_corr={p[3]:.3f} length_free_len_corr={q[3]:.3f} "
        f"cv_probe={p[4]:.3f} cv_length_free={q[4]:.3f} length_only_acc={length_only:.3f} heldout_diff={diff:.3f}"
    )


if __name__ == "__main__":
    main()
