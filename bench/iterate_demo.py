"""One `alignkit iterate` round on the demo task: SmolLM2-135M-Instruct samples replies to training
prompts, the demo's judge (`alignkit.demo_task:reward`: the instruction followed by a usable
sentence) scores them, each prompt's best and worst form a pair, DPO trains on the pairs, and the
held-out pass rate is compared before and after with a paired bootstrap interval.

    python bench/iterate_demo.py [--train 96] [--heldout 100] [--k 4] [--out runs/bench_iterate]

Unlike `alignkit demo` (which builds its pairs by editing replies with code), every pair here is
two of the model's own samples: the self-generated data loop of iterative DPO. Last line:
`heldout_pass before=<b> after=<a> n=<n>`. `--smoke` (examples/smoke.py): the same round in
seconds, with a tiny random-init model, which never passes the demo's judge: its reward is a regex
that about half of a random model's replies match (a reply naming a cat or a dog), so pairs form.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import smoke  # noqa: E402

SMOKE_REWARD = json.dumps({"name": "regex", "pattern": r"\b(cat|dog)\b"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=96)
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16, help="DPO steps")
    ap.add_argument("--reward", default="alignkit.demo_task:reward", help="the judge: a reward spec (name or JSON)")
    ap.add_argument("--out", default="runs/bench_iterate")
    args = smoke.parse_args(ap, train=4, heldout=4, k=4, steps=1, reward=SMOKE_REWARD)

    from alignkit import demo_task
    from alignkit.datatools.iterate import iterate
    from alignkit.generation.decode import SamplingParams
    from alignkit.models import default_model_dir
    from alignkit.rewards.build import parse_reward_arg

    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    prompts, held = out / "train_prompts.jsonl", out / "heldout_prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in demo_task.records(demo_task.train_prompts(args.train))))
    held.write_text("".join(json.dumps(r) + "\n" for r in demo_task.records(demo_task.heldout_prompts(args.heldout))))
    model = smoke.tiny_model_dir(out) if args.smoke else default_model_dir()
    overrides = [
        "recipe=dpo",
        f"model.name_or_path={model}",
        "losses=[{name: dpo, beta: 0.1, weight: 1.0}, {name: sft, weight: 1.0}]",
        "train.learning_rate=1e-5",
        "train.batch_size=8",
        f"train.max_steps={args.steps}",
        "train.warmup_ratio=0.1",
        "data.eval_fraction=0",
        "data.max_length=192",
        "train.report_to=[]",
    ]
    start = time.perf_counter()
    rows = iterate(
        None,
        overrides,
        prompts=str(prompts),
        heldout=str(held),
        reward_spec=parse_reward_arg(args.reward),
        rounds=1,
        k=args.k,
        min_margin=0.5,
        out=str(out / "iterate"),
        params=SamplingParams(max_new_tokens=48, temperature=1.0),
    )
    minutes = (time.perf_counter() - start) / 60
    r = rows[-1]
    print(
        f"\n1 round in {minutes:.1f} min: {r['pairs']} pairs from {args.train} prompts x {args.k} samples "
        f"({r['pair_counts']}); training samples' mean reward {r['train_reward_mean']:.3f}"
    )
    print(
        f"held-out pass rate {r['before']:.3f} -> {r['after']:.3f}, change {r['diff']:+.3f} "
        f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]; {r['improved']} prompts better, {r['worsened']} worse"
    )
    print(f"heldout_pass before={r['before']:.3f} after={r['after']:.3f} n={len(r['heldout_after'])}")


if __name__ == "__main__":
    main()
