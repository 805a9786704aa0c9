"""Length hacking and its defences (issue 31): GRPO against a reward model that pays for length,
against the same preferences' ODIN quality head, and against a mean_minus_std ensemble.

    python bench/length_hacking.py [--steps 60] [--pairs 2000]

A synthetic task on tiny random-init models (alignkit.testing's word vocabulary), so that the
mechanism shows in minutes on a CPU: a reply's true quality is whether it says "good" (q = 1 or
0, drawn independently of its length). Preference pairs of random replies are labelled by a known
mix of quality and length, P(first wins) = sigmoid(2.0 (q1 - q2) + 0.4 (L1 - L2)) (L in words,
2-14), so a reward model fitted to
them learns to pay for length as well as quality, as the HH-RLHF reward model of
bench/reward_model_hh.py pays for brevity. Three rewards are trained on the same pairs (`recipe:
reward`, every weight): the plain model; ODIN (`reward.disentangle: length`, arXiv 2402.07319),
whose quality head is the reward; and an ensemble of the plain model and two more seeds, combined
as mean - 1 std (arXiv 2310.02743). A tiny policy is then trained with GRPO against each
(`--steps` steps, 8 prompts x 8 samples of up to 24 tokens), from a warm start that gives short
replies (`--sft-steps` of SFT on 2-6-word replies). Reported per run: the mean sampled
completion length over the first and the last 5 steps, the held-out greedy replies' length and
true quality (the share that say "good"), and the health alerts raised. Last line:
`length plain=<a> odin=<b> ensemble=<c> quality plain=<d> odin=<e> ensemble=<f> start_length=<g>
start_quality=<h>` (held-out greedy replies after training; start: the untrained policy).
`--smoke` (examples/smoke.py): the same run in seconds, fewer pairs and steps.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import smoke  # noqa: E402

FILLER = ["the", "cat", "dog", "sky", "is", "blue", "red", "and", "a", "sun", "moon", "water", "fire"]
TOPICS = ["cat", "dog", "sky", "sun", "moon", "water", "fire", "earth", "city", "world"]


def reply(rng: random.Random, words: int, good: bool) -> str:
    """`words` words of filler, one of them "good" when `good`."""
    toks = [rng.choice(FILLER) for _ in range(words - good)] + ["good"] * good
    rng.shuffle(toks)
    return " ".join(toks) + " ."


def pairs(n: int, seed: int) -> list:
    """Preference pairs labelled by P(first wins) = sigmoid(2.0 dq + 0.4 dL), quality (whether the
    reply says "good") drawn independently of length."""
    import math

    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        prompt = f"tell me a story about the {rng.choice(TOPICS)} ."
        a = [rng.randint(2, 14) for _ in range(2)]
        q = [rng.random() < 0.5 for _ in a]
        first = rng.random() < 1 / (1 + math.exp(-(2.0 * (q[0] - q[1]) + 0.4 * (a[0] - a[1]))))
        r = [reply(rng, w, g) for w, g in zip(a, q)]
        if r[0] == r[1]:  # the same words in the same order says nothing: draw again
            continue
        rows.append({"prompt": prompt, "chosen": r[0] if first else r[1], "rejected": r[1] if first else r[0]})
    return rows


def prompts(n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [{"prompt": f"tell me a story about the {rng.choice(TOPICS)} ."} for _ in range(n)]


def write(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_policy(out: Path, model: str, steps: int) -> str:
    """The policy's start: a tiny model fine-tuned to give short replies (2-6 words, a "good" in a
    quarter of them), so that its length has room to grow in GRPO's 24 new tokens."""
    from alignkit.config import load_config
    from alignkit.train.loop import train

    rng = random.Random(4)
    rows = [{**p, "completion": reply(rng, rng.randint(2, 6), rng.random() < 0.25)} for p in prompts(512, seed=5)]
    data = write(out / "data" / "sft.jsonl", rows)
    run = out / "sft_policy"
    overrides = [
        "recipe=sft",
        f"model.name_or_path={model}",
        f"data.train={data}",
        "data.eval_fraction=0",
        f"train.max_steps={steps}",
        "train.batch_size=32",
        "train.learning_rate=3e-3",
        "train.report_to=[]",
        f"output_dir={run}",
    ]
    if not (run / "final" / "config.json").is_file():
        train(load_config(None, overrides), progress=False)
    return str(run / "final")


def train_rm(out: Path, model: str, data: Path, steps: int, seed: int, odin: bool) -> str:
    from alignkit.config import load_config
    from alignkit.train.loop import train

    run = out / ("rm_odin" if odin else f"rm_seed{seed}")
    overrides = [
        "recipe=reward",
        f"model.name_or_path={model}",
        f"data.train={data}",
        "data.eval_fraction=0.1",
        f"train.max_steps={steps}",
        "train.batch_size=32",
        "train.learning_rate=3e-3",
        "train.report_to=[]",
        f"seed={seed}",
        f"output_dir={run}",
    ] + (["reward.disentangle=length"] if odin else [])
    if not (run / "final" / "config.json").is_file():
        train(load_config(None, overrides), progress=False)
    return str(run / "final")


def grpo(out: Path, name: str, policy: str, reward, train_file: Path, held_file: Path, steps: int, lr: float) -> Path:
    from alignkit.config import load_config
    from alignkit.train.loop import train

    run = out / f"grpo_{name}"
    overrides = [
        "recipe=grpo",
        f"model.name_or_path={policy}",
        f"data.train={train_file}",
        f"data.eval={held_file}",
        f"online.rewards={json.dumps(reward)}",
        "generation.num_samples=8",
        "generation.max_new_tokens=24",
        "generation.temperature=1.0",
        "train.batch_size=8",
        f"train.max_steps={steps}",
        f"train.learning_rate={lr}",
        "train.warmup_ratio=0",
        "train.lr_schedule=constant",
        "train.log_every=1",
        f"train.eval_every={max(1, steps // 4)}",
        "train.report_to=[]",
        f"output_dir={run}",
    ]
    train(load_config(None, overrides), progress=False)
    return run


def greedy_stats(model_dir: str, held: list) -> tuple[float, float]:
    """(mean length in words, share saying "good") of greedy replies to the held-out prompts."""
    from alignkit.config import ModelConfig
    from alignkit.generation import SamplingParams, generate
    from alignkit.models import load_model, load_tokenizer

    mc = ModelConfig(name_or_path=model_dir)
    tok, model = load_tokenizer(mc), load_model(mc, for_training=False)
    msgs = [[{"role": "user", "content": r["prompt"]}] for r in held]
    texts = [g[0] for g in generate(model, tok, msgs, SamplingParams(max_new_tokens=24), batch_size=16)]
    words = [t.split() for t in texts]
    return sum(len(w) for w in words) / len(words), sum("good" in w for w in words) / len(words)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="GRPO steps per run")
    ap.add_argument("--rm-steps", type=int, default=600, help="reward-model steps")
    ap.add_argument("--lr", type=float, default=1e-3, help="GRPO's learning rate")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--sft-steps", type=int, default=150, help="the policy's warm start: steps of SFT on short replies")
    ap.add_argument("--out", default="runs/bench_length_hacking")
    args = smoke.parse_args(ap, steps=2, rm_steps=2, pairs=64, sft_steps=2)
    out = ROOT / args.out

    from alignkit.testing import save_tiny_model_dir
    from alignkit.train.metrics import read_metrics

    start = time.perf_counter()
    base = out / "tiny_rm_base"
    if not (base / "config.json").is_file():
        save_tiny_model_dir(base, seed=0, hidden=64, layers=2)
    tiny_policy = out / "tiny_policy"
    if not (tiny_policy / "config.json").is_file():
        save_tiny_model_dir(tiny_policy, seed=3, hidden=64, layers=2)
    policy = sft_policy(out, str(tiny_policy), args.sft_steps)
    data = write(out / "data" / "pairs.jsonl", pairs(args.pairs, seed=0))
    train_file = write(out / "data" / "prompts.jsonl", prompts(256, seed=1))
    held = prompts(32, seed=2)
    held_file = write(out / "data" / "heldout.jsonl", held)
    plain = train_rm(out, str(base), data, args.rm_steps, 0, odin=False)
    odin = train_rm(out, str(base), data, args.rm_steps, 0, odin=True)
    members = [plain] + [train_rm(out, str(base), data, args.rm_steps, s, odin=False) for s in (1, 2)]
    rewards = {
        "plain": [{"name": plain}],
        "odin": [{"name": odin}],
        "ensemble": [{"name": "ensemble", "members": members, "combine": "mean_minus_std", "k": 1.0}],
    }
    start_len, start_q = greedy_stats(policy, held)
    final = {}
    print(f"untrained policy, held-out greedy replies: length {start_len:.2f} words, quality {start_q:.3f}")
    print("\n| reward | sampled length, first 5 steps | last 5 steps | held-out length | held-out quality | alerts |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, reward in rewards.items():
        run = grpo(out, name, policy, reward, train_file, held_file, args.steps, args.lr)
        rows = read_metrics(run, "train")
        lengths = [r["completion_length"] for r in rows]
        alerts = [f"{r['rule']}@{r['step']}" for r in read_metrics(run) if r["split"] == "alert"]
        final[name] = greedy_stats(str(run / "final"), held)
        first, last = sum(lengths[:5]) / len(lengths[:5]), sum(lengths[-5:]) / len(lengths[-5:])
        print(
            f"| {name} | {first:.2f} | {last:.2f} | {final[name][0]:.2f} | {final[name][1]:.3f} | "
            f"{', '.join(alerts) or 'none'} |",
            flush=True,
        )
    print(f"{(time.perf_counter() - start) / 60:.1f} min in all")
    print(
        f"length plain={final['plain'][0]:.2f} odin={final['odin'][0]:.2f} ensemble={final['ensemble'][0]:.2f} "
        f"quality plain={final['plain'][1]:.3f} odin={final['odin'][1]:.3f} ensemble={final['ensemble'][1]:.3f} "
        f"start_length={start_len:.2f} start_quality={start_q:.3f}"
    )


if __name__ == "__main__":
    main()
