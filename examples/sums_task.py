"""The task of the CPU examples (`grpo_cpu.py`, `ppo_cpu.py`): SmolLM2-135M-Instruct learns to answer
small sums with the bare number, judged by the same reward and measured on the same held-out sums.

The prompts are generated (seeded): "What is 17 + 8? Reply with only the number." The reward sums two
verifiable checks: the last number of the reply is the right sum (`numeric_match`, 1.0), and the
reply is the bare number and nothing else (`regex`, 0.5). Held-out reward: each of 48 unseen sums
answered greedily, before and after training, with a paired bootstrap interval of the change.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

REWARDS = [
    {"name": "numeric_match", "answer_column": "answer", "weight": 1.0},
    {"name": "regex", "pattern": r"\s*-?\d+\s*\.?\s*", "search": False, "weight": 0.5},
]
N_HELDOUT = 48


def sums(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        rows.append({"prompt": f"What is {a} + {b}? Reply with only the number.", "answer": str(a + b)})
    return rows


def write_data(out: Path, n_train: int = 400, n_heldout: int = N_HELDOUT) -> tuple[Path, Path]:
    """The training sums (400) and the held-out ones (48), as prompt records."""
    out.mkdir(parents=True, exist_ok=True)
    train_file, held_file = out / "train.jsonl", out / "heldout.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in sums(n_train, seed=1)))
    held_file.write_text("".join(json.dumps(r) + "\n" for r in sums(n_heldout, seed=2)))
    return train_file, held_file


def common_overrides(train_file: Path, held_file: Path, out: Path, steps: int, lr: float, model: str) -> list[str]:
    """The settings both examples share: model, data, reward, sampling budget per rollout."""
    return [
        f"model.name_or_path={model}",
        f"data.train={train_file}",
        f"data.eval={held_file}",
        "data.max_length=96",
        f"online.rewards={json.dumps(REWARDS)}",
        "generation.num_samples=6",
        "generation.max_new_tokens=24",
        "generation.temperature=1.0",
        "generation.batch_size=8",
        "train.batch_size=4",
        f"train.max_steps={steps}",
        f"train.learning_rate={lr}",
        "train.warmup_ratio=0",
        "train.lr_schedule=constant",
        "train.log_every=1",
        "train.report_to=[]",
        f"output_dir={out / 'run'}",
    ]


def heldout_rewards(model_dir: str, held_file: Path) -> list[float]:
    """Each held-out prompt's reward for the model's greedy reply (as the runs' eval computes it)."""
    from alignkit.config import ModelConfig
    from alignkit.data.prompts import load_prompt_examples, prompt_columns
    from alignkit.generation import SamplingParams, generate
    from alignkit.models import load_model, load_tokenizer
    from alignkit.rewards import build_reward

    examples = load_prompt_examples(str(held_file)).examples
    mc = ModelConfig(name_or_path=model_dir)
    tokenizer, model = load_tokenizer(mc), load_model(mc, for_training=False)
    prompts = [list(e.prompt) for e in examples]
    replies = [r[0] for r in generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=24), batch_size=16)]
    return build_reward(REWARDS)(prompts, replies, **prompt_columns(examples))


def report(name: str, steps: int, minutes: float, run_dir: Path, start_model: str, held_file: Path) -> None:
    """Print the run's summary: held-out reward before/after with a paired 95% interval; last line
    `heldout_reward before=<b> after=<a> n=<n>`."""
    from alignkit.eval.stats import paired_bootstrap
    from alignkit.train.metrics import read_metrics

    rows = read_metrics(run_dir, "train")
    gen = sum(r["time/generation_s"] for r in rows) / max(1e-9, sum(r["step_time_s"] for r in rows))
    before, after = heldout_rewards(start_model, held_file), heldout_rewards(str(run_dir / "final"), held_file)
    d = paired_bootstrap(before, after)
    evals = read_metrics(run_dir, "eval")
    print(f"\n{steps} {name} steps in {minutes:.1f} min (sampling {100 * gen:.0f}% of step time)")
    for label, e in (("before", evals[0]), ("after", evals[-1])):
        parts = ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in e.items() if k.startswith("reward/"))
        print(f"held-out {label}: reward {e['reward']:.3f} ({parts}); mean length {e['completion_length']:.1f} tokens")
    print(
        f"change {d.diff:+.3f}, 95% paired bootstrap interval [{d.lo:+.3f}, {d.hi:+.3f}]; "
        f"{d.improved} prompts improved, {d.worsened} got worse"
    )
    print(f"heldout_reward before={d.before:.3f} after={d.after:.3f} n={d.n}")
