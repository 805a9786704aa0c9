"""The recipes hh_losses.py does not cover, on the same HH-RLHF harmless setting: SFT on the chosen
replies, KTO and BCO on the pairs split into thumbs up / down, D2O on the rejected replies alone,
and CPO (a paired loss), each scored on the same held-out pairs by one yardstick.

    python bench/hh_methods.py [--methods sft,kto,bco,d2o,cpo] [--train 128] [--steps 16] [--lr 2e-5]

Data: ../shared/data/hh_rlhf_harmless/dev.jsonl, the first `--train` usable rows for training
and the last 200 held out, as in hh_losses.py. Every method trains SmolLM2-135M-Instruct for
`--steps` steps of 8 examples at `--lr` (cosine), max_length 256, at its loss's defaults: SFT on
the chosen replies; KTO and BCO on 2 records per pair (chosen: label true, rejected: false); D2O
on the prompt and rejected reply only (4 own samples per prompt, up to 64 tokens); CPO on the
pairs. The yardstick, the same for all, is the held-out implicit-reward accuracy: is
beta (log pi(chosen) - log pi_ref(chosen)) > beta (log pi(rejected) - log pi_ref(rejected)) with
the untrained model as the reference (what `alignkit eval --reference` reports), beside the
trained model's own summed log-prob ranking and the change of the chosen replies' mean log-prob.
Intervals are 95% Wilson. Last line: `best=<method> implicit_accuracy=<x> n=<n>`. `--smoke`
(examples/smoke.py): the same run in seconds, a tiny model and synthetic pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))
import hh_data  # noqa: E402
import smoke  # noqa: E402

# method -> (recipe, extra overrides)
METHODS = {
    "sft": ("sft", []),
    "kto": ("unpaired", ["loss.name=kto"]),
    "bco": ("unpaired", ["loss.name=bco"]),
    "d2o": ("negative", ["loss.name=d2o", "generation.num_samples=4", "generation.max_new_tokens=64"]),
    "cpo": ("dpo", ["loss.name=cpo"]),
}


def training_file(method: str, rows: list, out: Path) -> Path:
    """The training records each recipe reads, from the same pairs."""
    from alignkit.data.formats import load_preference_examples

    pairs = hh_data.write_rows(out / "data" / "pairs.jsonl", rows)
    if method == "cpo":
        return pairs
    examples = load_preference_examples(str(pairs)).examples
    text = lambda msgs: "\n".join(m["content"] for m in msgs)  # noqa: E731
    if method == "d2o":  # the prompt and its rejected reply only
        recs = [{"prompt": list(e.prompt), "rejected": text(e.rejected)} for e in examples]
    elif method == "sft":
        recs = [{"prompt": list(e.prompt), "completion": text(e.chosen)} for e in examples]
    else:
        recs = [
            {"prompt": list(e.prompt), "completion": text(side), "label": good}
            for e in examples
            for side, good in ((e.chosen, True), (e.rejected, False))
        ]
    return hh_data.write_rows(out / "data" / f"{method}.jsonl", recs)


def tables(model_dir: str, items: list, tokenizer):
    from alignkit.config import ModelConfig
    from alignkit.eval.run import pair_tables
    from alignkit.models import load_model

    model = load_model(ModelConfig(name_or_path=model_dir, dtype="float32"), for_training=False).eval()
    return pair_tables(model, items, tokenizer.pad_token_id, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--train", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--beta", type=float, default=0.1, help="beta of the implicit reward (the yardstick)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="runs/bench_hh_methods")
    args = smoke.parse_args(ap, train=8, heldout=4, steps=1, max_length=64)
    out = ROOT / args.out
    hh = hh_data.smoke_hh(out) if args.smoke else hh_data.require_hh()

    from alignkit.config import ModelConfig, load_config
    from alignkit.data.formats import load_preference_examples
    from alignkit.data.tokenize import tokenize_pairs
    from alignkit.eval import metrics as M
    from alignkit.models import DEFAULT_MODEL, load_tokenizer
    from alignkit.train.loop import train

    base = smoke.tiny_model_dir(out) if args.smoke else DEFAULT_MODEL
    rows, skipped = hh_data.usable_rows(hh)
    train_rows = [r for _, r in rows[: args.train]]
    held = hh_data.write_rows(out / "data" / "heldout.jsonl", [r for _, r in rows[-args.heldout :]])
    print(f"HH-RLHF harmless: {len(skipped)} malformed rows skipped; train {args.train}, held-out {args.heldout}")
    tokenizer = load_tokenizer(ModelConfig(name_or_path=base))
    items, _ = tokenize_pairs(load_preference_examples(str(held)).examples, tokenizer, args.max_length, None)
    ref = tables(base, items, tokenizer)  # [N, 2] summed log-probs of the untrained model
    results = {}
    for method in args.methods.split(","):
        recipe, extra = METHODS[method]
        start = time.perf_counter()
        cfg = load_config(
            None,
            [
                f"recipe={recipe}",
                f"model.name_or_path={base}",
                f"data.train={training_file(method, train_rows, out)}",
                "data.eval_fraction=0",
                f"data.max_length={args.max_length}",
                f"train.max_steps={args.steps}",
                "train.batch_size=8",
                f"train.learning_rate={args.lr}",
                "train.report_to=[]",
                f"output_dir={out / method}",
                *extra,
            ],
        )
        final = str(train(cfg, progress=False).final_dir)
        pol = tables(final, items, tokenizer)
        rc, rr = args.beta * (pol[:, 0] - ref[:, 0]), args.beta * (pol[:, 1] - ref[:, 1])
        n_tok = [len(it.chosen_ids) for it in items]
        results[method] = {
            "implicit": M.ranking_accuracy(rc, rr),
            "ranking": M.ranking_accuracy(pol[:, 0], pol[:, 1]),
            "chosen_logp_change": float(sum((pol[:, 0] - ref[:, 0]).tolist()) / sum(n_tok)),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"{method}: implicit-reward accuracy {results[method]['implicit']['value']:.3f}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    base_rank = M.ranking_accuracy(ref[:, 0], ref[:, 1])
    print(
        "\n| method | implicit-reward accuracy [95% CI] | own ranking accuracy [95% CI] | chosen log-prob change "
        "(nats/token) | time (s) |\n| --- | --- | --- | --- | --- |"
    )
    ci = lambda a: f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"  # noqa: E731
    print(f"| untrained | 0.500 (ties) | {ci(base_rank)} | 0 | - |")
    for method, r in results.items():
        change = f"{r['chosen_logp_change']:+.4f}"
        print(f"| {method} | {ci(r['implicit'])} | {ci(r['ranking'])} | {change} | {r['seconds']:.0f} |")
    best = max(results, key=lambda m: results[m]["implicit"]["value"])
    print(f"best={best} implicit_accuracy={results[best]['implicit']['value']:.3f} n={len(items)}")


if __name__ == "__main__":
    main()
