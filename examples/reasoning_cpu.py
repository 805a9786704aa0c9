"""GRPO with a required reasoning block and a thinking budget on a 2-core CPU: SmolLM2-135M-Instruct
on GSM8K, the chat template opening `<think>` in the generation prompt (as DeepSeek-R1's does).

    python examples/reasoning_cpu.py [--steps 30] [--budget 96] [--out runs/example_reasoning_cpu]

The model has no reasoning training, so the template makes it start every reply inside a
reasoning block, and `generation.max_thinking_tokens` closes a block still open after `--budget`
tokens (the closing tag is inserted as context, not trained on). Rewards: `numeric_match` on the
answer after the block (GSM8K's `#### <number>`; a number in the reasoning does not count) plus
0.5 x `reasoning_format` (one closed, non-empty block, then a non-empty answer). Training prompts
come from the shared GSM8K train split, held-out ones from its test split (greedy, before and
after): accuracy and format rate with 95% paired bootstrap intervals, and the share of replies the
budget cut. At 135M parameters accuracy barely moves; the format and budget behaviour is what the
run shows. Last line: `heldout_accuracy before=<b> after=<a> format before=<fb> after=<fa>
budget_cut before=<cb> after=<ca> n=<n>`. `--smoke` (smoke.py): the same code in seconds, with a
tiny random-init model and synthetic sums.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import smoke

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import hh_data  # noqa: E402  (the shared data's paths and the smoke stand-ins)

SYSTEM = (
    "Solve the math problem. Think it through step by step, then close your reasoning with </think> "
    "and write the final answer on its own line as: #### <number>"
)
# ChatML with the reasoning block opened by the generation prompt (DeepSeek-R1's layout)
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
REWARDS = [{"name": "numeric_match"}, {"name": "reasoning_format", "weight": 0.5}]


def prompts(path: Path, start: int, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[start : start + n]]
    system = {"role": "system", "content": SYSTEM}
    return [{"prompt": [system, {"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in rows]


def smoke_model_dir(out: Path) -> str:
    """A tiny random-init model whose tokenizer writes `<think>` and `</think>` as tokens."""
    from alignkit.testing import reasoning_tokenizer, tiny_model

    path = out / "tiny_reasoning_model"
    if not (path / "config.json").is_file():
        tok = reasoning_tokenizer()
        tiny_model(vocab_size=len(tok), hidden=128).save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


def heldout(model_dir: str, template: Path, held_file: Path, max_new_tokens: int, budget: int) -> dict:
    """Greedy replies to the held-out prompts: {accuracy, format, cut} lists, one value per prompt."""
    from alignkit.config import ModelConfig
    from alignkit.data.prompts import load_prompt_examples, prompt_columns, tokenize_prompts
    from alignkit.generation.decode import SamplingParams, sample, thinking_params
    from alignkit.models import load_model, load_tokenizer
    from alignkit.rewards import build_reward
    from alignkit.rewards.functions import score_groups

    mc = ModelConfig(name_or_path=model_dir, chat_template=str(template))
    tokenizer, model = load_tokenizer(mc), load_model(mc, for_training=False)
    examples = load_prompt_examples(str(held_file)).examples
    items, _ = tokenize_prompts(examples, tokenizer, 1024)
    params = thinking_params(SamplingParams(max_new_tokens=max_new_tokens), tokenizer, ("<think>", "</think>"), budget)
    samples = sample(
        model,
        [it.prompt_ids for it in items],
        params,
        eos_ids=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        batch_size=16,
        tokenizer=tokenizer,
        progress=True,
    )
    # the prompt opened the block: the reply's text is its reasoning, `</think>`, then the answer
    _, parts = score_groups(
        build_reward(REWARDS),
        [list(ex.prompt) for ex in examples],
        [[s.text for s in group] for group in samples],
        prompt_columns(examples),
    )
    return {
        "accuracy": parts["numeric_match"],
        "format": parts["reasoning_format"],
        "cut": [float(group[0].thinking_cut) for group in samples],
        "example": samples[0][0].text,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="GRPO steps of 4 prompts x 4 samples")
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--budget", type=int, default=96, help="generation.max_thinking_tokens")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--heldout", type=int, default=64, help="held-out GSM8K test questions")
    ap.add_argument("--out", default="runs/example_reasoning_cpu")
    args = smoke.parse_args(ap, steps=1, heldout=4, budget=4, max_new_tokens=8)

    from alignkit.config import load_config
    from alignkit.eval.stats import paired_bootstrap
    from alignkit.models import default_model_dir
    from alignkit.train.loop import train
    from alignkit.train.metrics import read_metrics

    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        train_src = test_src = hh_data.smoke_gsm8k(out)
        model = smoke_model_dir(out)
    else:
        test_src = hh_data.require_gsm8k()
        train_src = test_src.parent / "train.jsonl"
        model = str(default_model_dir())
    train_file, held_file, template = out / "train.jsonl", out / "heldout.jsonl", out / "template.jinja"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in prompts(train_src, 0, 4 * args.steps)))
    held_file.write_text("".join(json.dumps(r) + "\n" for r in prompts(test_src, 0, args.heldout)))
    template.write_text(TEMPLATE)
    cfg = load_config(
        None,
        [
            "recipe=grpo",
            f"model.name_or_path={model}",
            f"model.chat_template={template}",
            f"data.train={train_file}",
            "data.eval_fraction=0",
            "data.max_length=512",
            f"online.rewards={json.dumps(REWARDS)}",
            "generation.num_samples=4",
            f"generation.max_new_tokens={args.max_new_tokens}",
            f"generation.max_thinking_tokens={args.budget}",
            "generation.temperature=1.0",
            "generation.batch_size=4",
            "train.batch_size=4",
            f"train.max_steps={args.steps}",
            f"train.learning_rate={args.lr}",
            "train.warmup_ratio=0",
            "train.lr_schedule=constant",
            "train.log_every=1",
            "train.report_to=[]",
            f"output_dir={out / 'run'}",
        ],
    )
    before = heldout(model, template, held_file, args.max_new_tokens, args.budget)
    start = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - start) / 60
    after = heldout(str(result.run_dir / "final"), template, held_file, args.max_new_tokens, args.budget)
    rows = read_metrics(result.run_dir, "train")
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r.get(k, 0.0) for r in rs) / len(rs)  # noqa: E731
    print(f"\n{args.steps} GRPO steps in {minutes:.1f} min")
    print(
        f"training samples, first 5 steps -> last 5: reward {mean(first, 'reward'):.3f} -> {mean(last, 'reward'):.3f}, "
        f"format {mean(first, 'reward/reasoning_format'):.3f} -> {mean(last, 'reward/reasoning_format'):.3f}, "
        f"reasoning tokens {mean(first, 'reasoning_length'):.1f} -> {mean(last, 'reasoning_length'):.1f}, "
        f"answer tokens {mean(first, 'answer_length'):.1f} -> {mean(last, 'answer_length'):.1f}, "
        f"cut by the budget {mean(first, 'thinking_cut'):.3f} -> {mean(last, 'thinking_cut'):.3f}"
    )
    for key in ("accuracy", "format"):
        d = paired_bootstrap(before[key], after[key])
        print(f"held-out {key}: {d.before:.3f} -> {d.after:.3f}, change {d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]")
    print(f"held-out example after: {after['example']!r}")
    share = lambda v: sum(v) / max(len(v), 1)  # noqa: E731
    print(
        f"heldout_accuracy before={share(before['accuracy']):.3f} after={share(after['accuracy']):.3f} "
        f"format before={share(before['format']):.3f} after={share(after['format']):.3f} "
        f"budget_cut before={share(before['cut']):.3f} after={share(after['cut']):.3f} n={len(before['cut'])}"
    )


if __name__ == "__main__":
    main()
