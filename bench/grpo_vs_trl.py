"""GRPO throughput and peak memory: alignkit's `recipe: grpo` against TRL 1.16.0's GRPOTrainer, same
model, prompts, reward and per-step work, one after the other (each in a fresh child process, so
peak memory is each framework's own).

    python bench/grpo_vs_trl.py                      # 4 prompts x 6 samples per step, 24 new tokens, 10 steps
    python bench/grpo_vs_trl.py --steps 20 --prompts-per-step 8 --num-samples 4 --max-new-tokens 32

The work is the task of examples/grpo_cpu.py (examples/sums_task.py): "What is 17 + 8? Reply with
only the number." prompts, generated with its seed 1, rendered by the model's chat template (both
frameworks get the prompt as one user message and produce the same token ids), and its reward:
1.0 when the reply's last number is the sum (`numeric_match`) plus 0.5 when the reply is the bare
number (`regex`). The reward is one Python function, `sums_reward` below, that both call: alignkit
as `online.rewards=bench/grpo_vs_trl.py:sums_reward` with texts, TRL as a `reward_funcs` entry with
assistant messages. The model is alignkit's bundled SmolLM2-135M-Instruct, de-quantized from its
GGUF into a plain transformers directory (`alignkit.models.default_model_dir()`), loaded in float32
by both. Neither shuffles, so step k of both trains on the same prompts k*P .. k*P+P-1.

With P = --prompts-per-step, G = --num-samples, N = --max-new-tokens, S = --steps:

    what                        alignkit                                  TRL GRPOConfig
    prompts per optimizer step  train.batch_size=P, train.grad_accum=1    per_device_train_batch_size=P*G (it counts
                                                                          completions), gradient_accumulation_steps=1
    samples per prompt          generation.num_samples=G                  num_generations=G
    sampling once per step      (a rollout per micro-batch)               steps_per_generation=1, so
                                generation.batch_size=P (one batch)       generation_batch_size=P*G (one generate call)
    reuse of the samples        online.iterations=1                       num_iterations=1 (no old-log-prob pass)
    max new tokens              generation.max_new_tokens=N               max_completion_length=N
    sampling                    generation.temperature=1, top_p=1,        temperature=1.0, top_p=1.0, top_k=0,
                                top_k=0, backend=transformers             min_p=None, repetition_penalty=1.0,
                                                                          use_vllm=False (model.generate)
    KL                          online.kl_coef=0 (no reference model)     beta=0.0 (no reference model)
    advantages                  online.scale_rewards=true                 scale_rewards="group" (unbiased std + 1e-4)
    loss aggregation            online.aggregation=--loss-type            loss_type=--loss-type (grpo: mean per
                                                                          sequence, then over sequences; dapo; dr_grpo)
    clipping                    loss={name: ppo_clip, clip_low: 0.2,      epsilon=0.2, epsilon_high=0.2 (no effect
                                clip_high: 0.2}                           with one update per sample: ratio = 1)
    steps                       train.max_steps=S                         max_steps=S
    optimizer                   AdamW, train.learning_rate=--lr,          AdamW (optim default), learning_rate=--lr,
                                weight_decay 0, betas (0.9, 0.999),       weight_decay=0, betas (0.9, 0.999),
                                train.max_grad_norm=1                     max_grad_norm=1.0
    schedule                    train.warmup_ratio=0,                     warmup_steps=0,
                                train.lr_schedule=constant                lr_scheduler_type="constant"
    precision                   model.dtype=float32, train.precision=fp32 bf16=False, fp16=False, use_cpu=True
    memory savers               model.gradient_checkpointing=false        gradient_checkpointing=False (TRL's default
                                                                          is True)
    dropout                     train.disable_dropout=true                disable_dropout=True (SmolLM2 has none)
    data order                  train.shuffle=false                       shuffle_dataset=False
    seed                        seed=0                                    seed=0
    logging, saving             train.log_every=1, train.report_to=[],    logging_steps=1, report_to=[],
                                train.save_every=0, no held-out split     save_strategy="no", no eval_dataset
                                (data.eval_fraction=0)

Measurement. Each framework runs in its own child process with torch threads = --threads (default
$OMP_NUM_THREADS, else the machine's cores; OMP_NUM_THREADS and MKL_NUM_THREADS are set to it too),
one after the other. Seconds: the optimizer steps only, each from the start of its sampling to the
end of its optimizer update (alignkit: the sum of its `step_time_s` metric; TRL: a callback from
`on_step_begin` to `on_step_end`), so model loading, setup, logging and saving are not counted;
`--warmup` steps at the start are left out of both. Samples: the completions sampled in the timed
steps (S * P * G; TRL's are counted as its reward function receives them and checked against that).
Sampling share: alignkit's `time/generation_s` metric; TRL's, from the step's start to the call
of its reward function (sampling, then decoding the completions; TRL logs its own timings to
wandb/mlflow/trackio only).
samples/s = samples / seconds. Peak memory: the child's peak resident set size
(`getrusage(RUSAGE_SELF).ru_maxrss`, as bench/dpo_vs_trl.py; it includes model loading and, for
alignkit, the final save). The parent imports no torch (a small helper process resolves the model
directory), because a child's ru_maxrss starts at the parent's high-water mark on Linux.

What differs, by design of each framework (this is what is being compared): alignkit samples with
its own KV-cache sampler, each prompt's prefill shared by its G samples, and trains on packed,
prefix-shared rows ([prompt][completion 1]..[completion G], no padding); TRL runs
`model.generate` on P*G left-padded rows and trains on padded [P*G, prompt + completion] rows.
Optimizer implementations are each one's default (TRL: transformers' `adamw_torch_fused`; alignkit:
`torch.optim.AdamW`'s default for CPU). The sampled completions differ (different random streams),
so completion lengths, and with them the work, differ a little: each line prints the mean
completion length to judge it by. alignkit writes `final/` and a report after training (untimed).

Last line: `samples_per_s_ratio=<alignkit/TRL> peak_memory_ratio=<alignkit/TRL>`.
Needs `pip install -e ".[bench]"` (trl==1.16.0). `--smoke` (examples/smoke.py): the same run in
seconds, with a tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import smoke  # noqa: E402
import sums_task  # noqa: E402  (pure Python: the prompts and the reward spec of the CPU examples)

CLIP = 0.2  # PPO clip range, both sides, both frameworks
_REWARD = []  # the built reward, once per process
REWARD_CALLS = []  # (time.perf_counter(), completions) of each call, for TRL's sampling time and count


def sums_reward(prompts: list, completions: list, **columns) -> list[float]:
    """The sums task's reward (`sums_task.REWARDS`: numeric_match 1.0 + bare-number regex 0.5), in
    both signatures: alignkit passes completions as texts and the data columns (`answer`); TRL
    passes them as assistant message lists, the columns too, and extra keywords it adds
    (`completion_ids`, `trainer_state`, ...), which are ignored."""
    REWARD_CALLS.append((time.perf_counter(), len(completions)))
    if not _REWARD:
        from alignkit.rewards import build_reward

        _REWARD.append(build_reward(sums_task.REWARDS))
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return _REWARD[0](prompts, texts, answer=columns["answer"])


def prompt_rows(args) -> list[dict]:
    """The training sums: the example's 400 (seed 1), more if the run needs more."""
    return sums_task.sums(max(400, args.steps * args.prompts_per_step), seed=1)


def run_alignkit(args, model: str, data: Path, out: Path) -> dict:
    from alignkit.config import load_config
    from alignkit.train.loop import train
    from alignkit.train.metrics import read_metrics

    loss = {"name": "ppo_clip", "clip_low": CLIP, "clip_high": CLIP}
    cfg = load_config(
        None,
        [
            "recipe=grpo",
            f"model.name_or_path={model}",
            "model.device=cpu",
            "model.dtype=float32",
            "model.gradient_checkpointing=false",
            f"data.train={data}",
            "data.eval_fraction=0",
            f"data.max_prompt_length={args.max_prompt_length}",
            f"data.max_length={args.max_prompt_length + args.max_new_tokens}",
            f"online.rewards={Path(__file__).resolve()}:sums_reward",
            "online.kl_coef=0",
            f"online.aggregation={args.loss_type}",
            "online.scale_rewards=true",
            "online.iterations=1",
            f"loss={json.dumps(loss)}",
            f"generation.num_samples={args.num_samples}",
            f"generation.max_new_tokens={args.max_new_tokens}",
            "generation.temperature=1.0",
            "generation.top_p=1.0",
            "generation.top_k=0",
            f"generation.batch_size={args.prompts_per_step}",
            "generation.backend=transformers",
            f"train.batch_size={args.prompts_per_step}",
            "train.grad_accum=1",
            f"train.max_steps={args.steps}",
            f"train.learning_rate={args.lr}",
            "train.warmup_ratio=0",
            "train.lr_schedule=constant",
            "train.weight_decay=0",
            "train.max_grad_norm=1.0",
            "train.precision=fp32",
            "train.disable_dropout=true",
            "train.shuffle=false",
            "train.log_every=1",
            "train.save_every=0",
            "train.report_to=[]",
            "seed=0",
            f"output_dir={out / 'alignkit'}",
        ],
    )
    train(cfg, progress=False)
    rows = read_metrics(out / "alignkit", "train")
    timed = rows[args.warmup :]
    per_step = args.prompts_per_step * args.num_samples
    return {
        "seconds": sum(r["step_time_s"] for r in timed),
        "samples": per_step * len(timed),
        "steps": len(timed),
        "sampling_seconds": sum(r["time/generation_s"] for r in timed),
        "completion_length": sum(r["completion_length"] for r in rows) / len(rows),
        "reward_first": rows[0]["reward"],
        "reward_last": rows[-1]["reward"],
    }


def run_trl(args, model: str, data: Path, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )
    tok = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    times, row_logs, sampled = [], [], []

    class Recorder(TrainerCallback):
        def on_step_begin(self, *a, **k):
            REWARD_CALLS.clear()
            times.append([time.perf_counter()])

        def on_step_end(self, *a, **k):
            times[-1].append(time.perf_counter())
            # one generation per step (steps_per_generation=1), scored by one reward call
            sampled.append(
                [sum(n for _, n in REWARD_CALLS), REWARD_CALLS[0][0] - times[-1][0] if REWARD_CALLS else 0.0]
            )

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "reward" in logs:  # one train row per step (logging_steps=1)
                row_logs.append(dict(logs, step=state.global_step))

    g = args.num_samples
    config = GRPOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=args.prompts_per_step * g,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=g,
        num_iterations=1,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        use_vllm=False,
        beta=0.0,
        scale_rewards="group",
        loss_type=args.loss_type,
        epsilon=CLIP,
        epsilon_high=CLIP,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        disable_dropout=True,
        shuffle_dataset=False,
        seed=0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        log_completions=False,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[sums_reward],
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[Recorder()],
    )
    trainer.train()
    timed, timed_samples = times[args.warmup :], sampled[args.warmup :]
    samples = sum(n for n, _ in timed_samples)
    expected = len(timed) * args.prompts_per_step * g
    if samples != expected:
        sys.exit(
            f"TRL sampled {samples} completions in {len(timed)} timed steps; expected {expected}: "
            "the per-step mapping is wrong"
        )
    return {
        "seconds": sum(b - a for a, b in timed),
        "samples": samples,
        "steps": len(timed),
        "sampling_seconds": sum(s for _, s in timed_samples),
        "completion_length": sum(r["completions/mean_length"] for r in row_logs) / len(row_logs),
        "reward_first": row_logs[0]["reward"],
        "reward_last": row_logs[-1]["reward"],
    }


def worker(args) -> None:
    import resource

    import torch

    if args.worker == "model":
        from alignkit.models import default_model_dir

        path = smoke.tiny_model_dir(args.out) if args.smoke else default_model_dir()
        print("RESULT " + json.dumps({"model": str(path)}), flush=True)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = ROOT / args.out
    fn = run_alignkit if args.worker == "alignkit" else run_trl
    result = fn(args, args.model_path, Path(args.data), out)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result["samples_per_s"] = result["samples"] / result["seconds"]
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


def child(name: str, args, extra: list) -> dict:
    """Run `--worker name` in a fresh process; its RESULT dict."""
    cmd = [sys.executable, __file__, "--worker", name, *extra, *sys.argv[1:], "--out", str(ROOT / args.out)]
    env = dict(
        os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads)
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[-1][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--num-samples", type=int, default=6, help="completions per prompt (the group size)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-6, help="learning rate (examples/grpo_cpu.py's)")
    ap.add_argument(
        "--loss-type",
        choices=["grpo", "dapo", "dr_grpo"],
        default="grpo",
        help="TRL's loss_type = alignkit's online.aggregation (grpo: alignkit's default and the example's)",
    )
    ap.add_argument("--warmup", type=int, default=0, help="steps at the start left out of the timing (both)")
    ap.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()),
        help="torch threads of each child (default: $OMP_NUM_THREADS, else the machine's cores)",
    )
    ap.add_argument("--max-prompt-length", type=int, default=128, help=argparse.SUPPRESS)  # the sums are ~46 tokens
    ap.add_argument("--only", choices=["alignkit", "trl"], help="run one framework only")
    ap.add_argument("--out", default="runs/bench_grpo_vs_trl")
    ap.add_argument("--worker", choices=["model", "alignkit", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = smoke.parse_args(ap, steps=2, warmup=1, prompts_per_step=2, num_samples=2, max_new_tokens=4)
    if args.worker:
        return worker(args)
    if args.num_samples < 2:
        ap.error("--num-samples must be at least 2 (GRPO's baseline is the group's mean)")
    if args.warmup >= args.steps:
        ap.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")

    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(args)))
    path = child("model", args, [])["model"]
    print(
        f"GRPO, {args.steps} steps of {args.prompts_per_step} prompts x {args.num_samples} samples, up to "
        f"{args.max_new_tokens} new tokens, loss_type {args.loss_type}, fp32, {args.threads} threads; model {path}",
        flush=True,
    )
    results = {}
    for name in [args.only] if args.only else ["alignkit", "trl"]:
        r = results[name] = child(name, args, ["--model-path", path, "--data", str(data)])
        print(
            f"{name}: {r['samples_per_s']:.2f} samples/s ({r['samples']} samples in {r['steps']} steps, "
            f"{r['seconds']:.1f} s, sampling {100 * r['sampling_seconds'] / r['seconds']:.0f}%), "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB, mean completion {r['completion_length']:.1f} tokens, "
            f"mean reward {r['reward_first']:.3f} (step 1) -> {r['reward_last']:.3f} (step {args.steps})",
            flush=True,
        )
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    if "alignkit" in results and "trl" in results:
        a, t = results["alignkit"], results["trl"]
        print(
            f"samples_per_s_ratio={a['samples_per_s'] / t['samples_per_s']:.2f} "
            f"peak_memory_ratio={a['peak_rss_mib'] / t['peak_rss_mib']:.2f}"
        )


if __name__ == "__main__":
    main()
