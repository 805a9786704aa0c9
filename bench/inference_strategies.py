"""Every inference-time strategy on SmolLM2-135M-Instruct (CPU): reward, constraint satisfaction,
win rate against sampling, KL and cost, on two tasks.

    python bench/inference_strategies.py [--prompts 24] [--max-new-tokens 48] [--tasks keywords,harmless]

Tasks (held-out prompts; nothing here is trained on them):
- keywords (programmatic constraint, CommonGen-style): "Write one sentence that uses all of these
  words: a, b, c." with three words drawn (seeded) from a fixed list. Reward: the fraction of the
  words present (`keywords` with `required_column`); satisfied: all three present.
- harmless (reward model): the last human turn of HH-RLHF harmless conversations, rows 1001+ of
  ../shared/data/hh_rlhf_harmless/dev.jsonl (prompts of at most 160 tokens; the longer ones are
  counted and skipped). Reward: the reward model of `bench/reward_model_hh.py`
  (runs/bench_reward_model_hh/run/final, trained on rows 1-1000). Transfer Q*'s baseline: the DPO
  model of `bench/hh_losses.py --train 128` (runs/bench_hh_losses/dpo/final, 16 steps on rows 1-128). Run those
  two first; without them this task is skipped with a message.

Controlled decoding's value head is fitted per task (`alignkit.inference.value`) on other
prompts: 48 fresh concept sets, or HH rows 301-1000. Everything samples at temperature 1. Results
go to OUT/results.json (each strategy is kept once done, so a rerun continues) and a Markdown
table is printed. Last line: `best_reward <task>=<strategy>:<mean reward> ...` (each task run).
`--smoke` (examples/smoke.py): every strategy in seconds, a tiny random-init model (and, for the
harmless task, synthetic conversations, that model as the DPO model and a random-head reward model).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))
import hh_data  # noqa: E402
import smoke  # noqa: E402

WORDS = (
    "dog river bread window guitar mountain teacher rain garden candle bicycle ocean kitchen "
    "letter winter forest coffee train market moon child stone clock bridge apple ship lamp "
    "school flower snow road cloud book field horse island song painter storm wheel"
).split()


def concept_sets(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        rows.append({"prompt": f"Write one sentence that uses all of these words: {', '.join(words)}.", "words": words})
    return rows


def hh_prompts(rows: list, tokenizer, limit: int, max_tokens: int = 160) -> tuple[list, int]:
    """The conversation up to its last human turn, as messages; prompts over max_tokens skipped."""
    from alignkit.data.formats import parse_preference_record
    from alignkit.generation.hf import encode_prompts

    out, skipped = [], 0
    for i, r in rows:
        ex = parse_preference_record(r, f"dev.jsonl:{i}")
        prompt = list(ex.prompt)
        if len(encode_prompts(tokenizer, [prompt])[0]) > max_tokens:
            skipped += 1
            continue
        out.append({"prompt": prompt})
        if len(out) == limit:
            break
    return out, skipped


def strategies_for(task: str) -> list[tuple[str, dict]]:
    soft_t = 0.1 if task == "keywords" else 0.5
    runs = [
        ("sample", {}),
        ("best-of-n", {"n": 8}),
        ("soft-best-of-n", {"n": 8, "soft_temperature": soft_t}),
        ("deal", {"beam": 2, "candidates": 4, "block": 12, "lookahead": 12}),
        ("controlled-decoding", {"candidates": 8, "strength": 2.0}),
    ]
    if task == "harmless":
        runs.append(("transfer-q", {"candidates": 4, "block": 12, "horizon": 24}))
    runs.append(("urial", {}))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--tasks", default="keywords,harmless")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--fit-prompts", type=int, default=48, help="prompts the value head is fitted on, per task")
    ap.add_argument(
        "--reward-model",
        help="the harmless task's reward model (default: the one "
        "python bench/reward_model_hh.py trains, runs/bench_reward_model_hh/run/final)",
    )
    ap.add_argument(
        "--dpo-model",
        help="Transfer Q*'s baseline for the harmless task (default: the DPO model "
        "python bench/hh_losses.py trains, runs/bench_hh_losses/dpo/final)",
    )
    ap.add_argument("--out", default="runs/bench_inference")
    args = smoke.parse_args(ap, prompts=2, max_new_tokens=4, fit_prompts=4)

    import torch

    from alignkit.config import ModelConfig
    from alignkit.eval.metrics import bootstrap_mean_ci, win_rate
    from alignkit.generation.decode import SamplingParams
    from alignkit.generation.hf import encode_prompts
    from alignkit.inference.strategies import StrategyOptions, run_strategy
    from alignkit.inference.value import fit_value_head
    from alignkit.models import load_model, load_tokenizer
    from alignkit.rewards.model import RewardModel
    from alignkit.rewards.verifiable import Keywords

    torch.manual_seed(0)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    model_name = smoke.tiny_model_dir(out) if args.smoke else "smollm2-135m-instruct"
    args.reward_model = args.reward_model or (
        smoke.tiny_reward_model_dir(out) if args.smoke else str(ROOT / "runs/bench_reward_model_hh/run/final")
    )
    args.dpo_model = args.dpo_model or (model_name if args.smoke else str(ROOT / "runs/bench_hh_losses/dpo/final"))
    mc = ModelConfig(name_or_path=model_name)
    tokenizer, model = load_tokenizer(mc), load_model(mc, for_training=False).eval()
    params = SamplingParams(args.max_new_tokens, temperature=1.0)

    for task in args.tasks.split(","):
        baseline = None
        if task == "keywords":
            evals, fits = concept_sets(args.prompts, seed=2), concept_sets(args.fit_prompts, seed=1)
            reward = Keywords(required_column="words", partial=True)
            note = {}
        elif task == "harmless":
            rm_dir, dpo_dir = Path(args.reward_model), Path(args.dpo_model)
            if not (rm_dir / "config.json").is_file() or not (dpo_dir / "config.json").is_file():
                print(
                    f"skipped task harmless: needs {rm_dir} (python bench/reward_model_hh.py) and {dpo_dir} "
                    "(python bench/hh_losses.py)"
                )
                continue
            rows, _ = hh_data.usable_rows(hh_data.smoke_hh(out) if args.smoke else hh_data.require_hh())
            evals, skipped = hh_prompts([(i, r) for i, r in rows if i > 1000], tokenizer, args.prompts)
            fits, _ = hh_prompts([(i, r) for i, r in rows if 300 < i <= 1000], tokenizer, args.fit_prompts)
            reward = RewardModel(str(rm_dir))
            baseline = load_model(ModelConfig(name_or_path=str(dpo_dir), dtype="float32"), for_training=False).eval()
            note = {"prompts_over_160_tokens_skipped": skipped}
        else:
            sys.exit(f"unknown task {task!r}: keywords or harmless")
        prompts = [
            r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}] for r in evals
        ]
        columns = {"words": [r["words"] for r in evals]} if task == "keywords" else {}
        done = results.setdefault(task, {"strategies": {}, **note})["strategies"]

        value_dir = out / f"value_{task}"
        if not (value_dir / "value_head.safetensors").is_file():
            t0 = time.perf_counter()
            fp = [
                r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
                for r in fits
            ]
            fcols = {"words": [r["words"] for r in fits]} if task == "keywords" else {}
            head = fit_value_head(
                model,
                tokenizer,
                reward,
                fp,
                encode_prompts(tokenizer, fp),
                fcols,
                SamplingParams(args.max_new_tokens, 1.0, n=4),
                model_name=model_name,
            )
            head.save(value_dir)
            results[task]["value_head"] = dict(head.meta, seconds=time.perf_counter() - t0)
            results_file.write_text(json.dumps(results, indent=2))
            print(
                f"{task}: value head fitted in {time.perf_counter() - t0:.0f} s, held-out R^2 "
                f"{head.meta['heldout_r2']}",
                flush=True,
            )

        base_rewards = None
        for name, opts in strategies_for(task):
            if name in done:
                if name == "sample":
                    base_rewards = done[name]["rewards"]
                continue
            options = StrategyOptions(value=str(value_dir), **opts)
            res = run_strategy(
                name,
                model,
                tokenizer,
                reward,
                prompts,
                columns,
                params,
                options,
                seed=0,
                batch_size=args.batch_size,
                baseline_model=baseline,
            )
            rewards = [c.reward for c in res.choices]
            mean, lo, hi = bootstrap_mean_ci(rewards)
            row = {
                "options": opts,
                "reward": mean,
                "ci95": [lo, hi],
                "rewards": rewards,
                "kl": res.kl,
                "kl_kind": res.kl_kind,
                "seconds": res.seconds,
                "seconds_per_prompt": res.seconds / len(prompts),
                "new_tokens_per_prompt": res.new_tokens / len(prompts),
                "prompt_tokens_per_prompt": res.prompt_tokens / len(prompts),
                "examples": [
                    {"prompt": p[-1]["content"], "completion": c.completion, "reward": c.reward}
                    for p, c in list(zip(prompts, res.choices))[:3]
                ],
            }
            if task == "keywords":
                row["satisfied"] = sum(r == 1.0 for r in rewards) / len(rewards)
            if name == "sample":
                base_rewards = rewards
            elif base_rewards is not None:
                row["win_rate_vs_sample"] = win_rate(rewards, base_rewards)
            done[name] = row
            results_file.write_text(json.dumps(results, indent=2))
            print(
                f"{task} {name}: reward {mean:.3f} [{lo:.3f}, {hi:.3f}] "
                f"{'satisfied %.2f ' % row['satisfied'] if 'satisfied' in row else ''}"
                f"{res.seconds / len(prompts):.1f} s/prompt, {res.new_tokens / len(prompts):.0f} new tokens/prompt, "
                f"KL {res.kl if res.kl is None else round(res.kl, 2)} ({res.kl_kind})",
                flush=True,
            )

    print(table(results))
    best = {
        task: max(r["strategies"].items(), key=lambda kv: kv[1]["reward"])
        for task, r in results.items()
        if r["strategies"]
    }
    print("best_reward " + " ".join(f"{task}={name}:{s['reward']:.3f}" for task, (name, s) in best.items()))


def table(results: dict) -> str:
    lines = []
    for task, r in results.items():
        vh = r.get("value_head", {})
        lines += [
            f"\n**{task}**"
            + (
                f" (value head held-out R^2 {vh['heldout_r2']:.2f}, ridge l2 {vh['l2']:g})"
                if vh.get("heldout_r2") is not None
                else ""
            ),
            "",
            "| strategy | settings | reward [95% CI] | all words | win rate vs sample | KL (nats) | s / prompt | new "
            "tokens / prompt | prompt tokens / prompt |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        order = ["sample", "best-of-n", "soft-best-of-n", "deal", "controlled-decoding", "transfer-q", "urial"]
        for name, s in sorted(r["strategies"].items(), key=lambda kv: order.index(kv[0])):
            wr = s.get("win_rate_vs_sample")
            kl = "-" if s["kl"] is None else f"{s['kl']:.2f} ({s['kl_kind']})"
            opts = ", ".join(f"{k}={v}" for k, v in s["options"].items()) or "-"
            lines.append(
                f"| {name} | {opts} | {s['reward']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | "
                f"{'%.2f' % s['satisfied'] if 'satisfied' in s else '-'} | "
                f"{'%.2f' % wr['value'] if wr else '-'} | {kl} | {s['seconds_per_prompt']:.1f} | "
                f"{s['new_tokens_per_prompt']:.0f} | {s['prompt_tokens_per_prompt']:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
