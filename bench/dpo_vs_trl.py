"""DPO throughput and peak memory: alignkit against TRL 1.16.0's DPOTrainer, same model, data, pairs
per step and max length, one after the other (each in a fresh child process, so peak memory is
each framework's own).

    python bench/dpo_vs_trl.py --device cpu --model smollm2-135m-instruct --pairs-per-step 4 --max-length 512 --steps 20
    python bench/dpo_vs_trl.py --device cuda --model llama:960x32 --pairs-per-step 8 --max-length 1024

TRL computes its reference every step with a frozen copy (its default). alignkit by default computes
the reference log-probs once before training with the policy itself (`reference: cached`, so no
second model is in memory); that pass is timed (the run's `timings.setup_s` in its summary.json:
the recipe's setup, which for DPO with a cached reference is that pass) and its time is charged to
the timed steps pro rata (`--reference live` runs a frozen copy every step instead). Both use
AdamW, lr 1e-6, no gradient checkpointing, bf16 on CUDA and fp32 on CPU. Tokens are counted the
same way for both: every non-pad token of prompt + chosen and of prompt + rejected, as each framework
tokenized them (the prompt counts twice even when alignkit computes it once). Both get the pairs
as chat messages, so both render them with the model's chat template. Timing: `--steps` steps
after `--warmup` steps; tokens of the timed steps are the mean tokens per step over the run
times the timed steps (both frameworks shuffle, so the exact timed pairs are not known).
Before timing, a check (`--check-pairs`, default 16) feeds the same token ids (TRL's tokenization
of the first pairs) to TRL's padded forward and to alignkit's packed, prefix-shared one on the
untrained checkpoint and prints the mean and max absolute difference of the per-sequence log-probs,
and each one's mean distance from an independent float64 forward (one sequence at a time).
Last line: `tokens_per_s_ratio=<alignkit/TRL> peak_memory_ratio=<alignkit/TRL>`.
Needs `pip install -e ".[bench]"` (trl==1.16.0) and ../shared/data (HH-RLHF harmless).
`--smoke` (examples/smoke.py): the same run in seconds, a tiny model and synthetic pairs.
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
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))
import hh_data  # noqa: E402
import smoke  # noqa: E402

SHAPES = {  # random-init Llama-style shapes of the issue (SmolLM2 tokenizer, vocab 49152, tied embeddings)
    "llama:960x32": dict(
        hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560
    ),
    "llama:2048x24": dict(
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192
    ),
}


def model_dir(name: str, out: Path) -> str:
    """A local model directory: the bundled model, a random-init shape, or a path / hub id."""
    from alignkit.models import resolve_model_path

    base = resolve_model_path("smollm2-135m-instruct")
    if name not in SHAPES:
        return resolve_model_path(name)
    path = out / name.replace(":", "_")
    if not (path / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        cfg = AutoConfig.from_pretrained(base)
        for k, v in SHAPES[name].items():
            setattr(cfg, k, v)
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return str(path)


def conversational_rows(n: int, hh: Path) -> list[dict]:
    """The first n usable pairs of the HH file `hh` as explicit prompt / chosen / rejected message lists."""
    from alignkit.data.formats import parse_preference_record

    rows = []
    for i, r in hh_data.usable_rows(hh)[0][:n]:
        ex = parse_preference_record(r, f"hh:{i}")
        rows.append({"prompt": list(ex.prompt), "chosen": list(ex.chosen), "rejected": list(ex.rejected)})
    return rows


def run_alignkit(args, model: str, data: Path, out: Path) -> dict:
    import shutil

    from alignkit.config import load_config
    from alignkit.train import loop
    from alignkit.train.metrics import read_metrics

    # The cached reference pass is the recipe's setup, timed by the loop (summary.json
    # `timings.setup_s`); it is charged pro rata to the timed steps (their share of the pairs). A
    # fresh cache directory makes sure it really runs.
    shutil.rmtree(out / "alignkit_cache", ignore_errors=True)
    total = args.warmup + args.steps
    cfg = load_config(
        None,
        [
            f"model.name_or_path={model}",
            f"data.train={data}",
            "data.eval_fraction=0",
            f"data.max_length={args.max_length}",
            f"reference={args.reference}",
            f"cache_dir={out / 'alignkit_cache'}",
            f"train.batch_size={args.pairs_per_step}",
            f"train.max_steps={total}",
            "train.learning_rate=1e-6",
            "train.warmup_ratio=0",
            "train.report_to=[]",
            f"output_dir={out / 'alignkit'}",
            f"model.device={args.device}",
            f"train.precision={'bf16' if args.device == 'cuda' else 'fp32'}",
            f"train.pack_tokens={args.pack_tokens}",
            *([f"train.logprob_chunk_size={args.chunk_size}"] if args.chunk_size else []),
            *([f"train.forward_tokens={args.forward_tokens}"] if args.forward_tokens else []),
            f"train.packing={'false' if args.no_packing else 'true'}",
        ],
    )
    loop.train(cfg, progress=False)
    rows = read_metrics(out / "alignkit", "train")
    timed = rows[args.warmup :]
    mean_tokens = sum(r["tokens"] for r in rows) / len(rows)
    setup_s = json.loads((out / "alignkit" / "summary.json").read_text())["timings"]["setup_s"]
    reference = (setup_s if args.reference == "cached" else 0.0) * len(timed) / len(rows)
    return {
        "seconds": sum(r["step_time_s"] for r in timed) + reference,
        "reference_seconds": reference,
        "tokens": mean_tokens * len(timed),
        "exact_timed_tokens": sum(r["tokens"] for r in timed),
        "steps": len(timed),
    }


def run_trl(args, model: str, data: Path, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append([time.perf_counter()])

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[-1].append(time.perf_counter())

    config = DPOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=args.pairs_per_step,
        max_length=args.max_length,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=dtype == torch.bfloat16,
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        model=policy, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Timer()]
    )
    ds = trainer.train_dataset
    per_pair = [len(p) * 2 + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    trainer.train()
    timed = times[args.warmup :]
    # TRL truncates prompt + completion to max_length (keep_start): count what it trained on.
    per_pair = [min(n, 2 * args.max_length) for n in per_pair]
    mean_tokens = sum(per_pair) / len(per_pair) * args.pairs_per_step
    return {"seconds": sum(b - a for a, b in timed), "tokens": mean_tokens * len(timed), "steps": len(timed)}


def check_logprobs(args, model: str, data: Path, out: Path) -> dict:
    """Per-sequence log-probs of the same token ids, TRL's padded forward against alignkit's
    packed, prefix-shared, chunked one (the checkpoint before training; fp32 on CPU, bf16 on CUDA)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignkit.data.batching import collate_packed_groups
    from alignkit.data.tokenize import TokenizedPair
    from alignkit.logprobs import segment_logps

    rows = [json.loads(line) for line in data.read_text().splitlines()][: args.check_pairs]
    tok = AutoTokenizer.from_pretrained(model)
    bf16 = args.device == "cuda"
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(args.device)
    config = DPOConfig(
        output_dir=str(out / "trl_check"),
        per_device_train_batch_size=len(rows),
        max_length=args.max_length,
        report_to=[],
        bf16=bf16,
        use_cpu=args.device == "cpu",
    )
    trainer = DPOTrainer(model=policy, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok)
    ds = trainer.train_dataset
    # Pairs TRL does not truncate (it cuts prompt + completion at max_length, keep_start).
    keep = [
        i
        for i in range(len(ds))
        if len(ds[i]["prompt_ids"]) + max(len(ds[i]["chosen_ids"]), len(ds[i]["rejected_ids"])) <= args.max_length
    ]
    if not keep:
        sys.exit(f"log-prob check: all {len(rows)} pairs are longer than --max-length {args.max_length}; raise it")
    examples = [ds[i] for i in keep]
    inputs = {k: v.to(args.device) for k, v in trainer.data_collator(examples).items()}
    policy.eval()
    trl_chosen, trl_rejected = trainer.compute_ref_log_probs(policy, inputs)
    pairs = [TokenizedPair(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], i) for i, e in enumerate(examples)]
    batch = collate_packed_groups(pairs, tok.pad_token_id, args.pack_tokens).to(args.device)
    with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16, enabled=bf16):
        ours = segment_logps(policy, batch).logps
    theirs = torch.cat([trl_chosen, trl_rejected]).float()
    # An independent float64 answer: a fresh copy of the checkpoint (TRL patches the forward of the
    # model it trains), one plain transformers forward per sequence, no padding.
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64).to(args.device).eval()
    truth = []
    with torch.no_grad():
        for key in ("chosen_ids", "rejected_ids"):
            for e in examples:
                ids = torch.tensor([e["prompt_ids"] + e[key]], device=args.device)
                logp = torch.log_softmax(policy(ids).logits[0].double(), -1)
                n = len(e["prompt_ids"])
                truth.append(sum(logp[n + j - 1, t] for j, t in enumerate(e[key])))
    truth = torch.stack(truth).cpu()
    ours, theirs = ours.double().cpu(), theirs.double().cpu()
    diff = (ours - theirs).abs()
    return {
        "pairs": len(keep),
        "skipped_truncated": len(rows) - len(keep),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff": float(diff.max()),
        "mean_abs_logp": float(theirs.abs().mean()),
        "alignkit_vs_float64": float((ours - truth).abs().mean()),
        "trl_vs_float64": float((theirs - truth).abs().mean()),
        "dtype": "bf16" if bf16 else "fp32",
    }


def worker(args) -> None:
    import resource

    import torch

    torch.manual_seed(0)
    out = ROOT / args.out
    if args.worker == "check":
        print("RESULT " + json.dumps(check_logprobs(args, args.model_path, Path(args.data), out)), flush=True)
        return
    fn = run_alignkit if args.worker == "alignkit" else run_trl
    result = fn(args, args.model_path, Path(args.data), out)
    if args.device == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        # VmHWM: the peak RSS of this process image. ru_maxrss would start at the parent's high-water
        # mark (Linux keeps it across fork and exec), and the parent imported torch to build the data.
        status = Path("/proc/self/status")
        hwm = (
            [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")] if status.is_file() else []
        )
        kib = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["peak_memory_mb"] = kib / 1024
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--model", default="smollm2-135m-instruct", help="a model dir / hub id, or llama:960x32 / llama:2048x24"
    )
    ap.add_argument("--pairs-per-step", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pack-tokens", type=int, default=2048)
    ap.add_argument(
        "--forward-tokens",
        type=int,
        help="alignkit's train.forward_tokens: forward/backward in pieces "
        "of at most this many tokens (default: one piece per micro-batch)",
    )
    ap.add_argument("--chunk-size", type=int, help="alignkit's train.logprob_chunk_size (default: its own default)")
    ap.add_argument("--no-packing", action="store_true", help="alignkit without prefix sharing / packing")
    ap.add_argument(
        "--reference",
        choices=["cached", "live"],
        default="cached",
        help="alignkit's reference: log-probs computed once before training (timed, charged to the "
        "timed steps pro rata) or a frozen copy run every step",
    )
    ap.add_argument("--only", choices=["alignkit", "trl", "check"], help="run one part only")
    ap.add_argument(
        "--check-pairs", type=int, default=16, help="pairs for the log-prob agreement check before timing (0: skip it)"
    )
    ap.add_argument("--out", default="runs/bench_dpo_vs_trl")
    ap.add_argument("--worker", choices=["alignkit", "trl", "check"], help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = smoke.parse_args(ap, pairs_per_step=2, max_length=128, steps=1, warmup=1, check_pairs=2)
    if args.worker:
        return worker(args)

    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    data = out / "pairs.jsonl"
    n = args.pairs_per_step * (args.warmup + args.steps)
    hh = hh_data.smoke_hh(out) if args.smoke else hh_data.require_hh()
    data.write_text("".join(json.dumps(r) + "\n" for r in conversational_rows(n, hh)))
    path = smoke.tiny_model_dir(out) if args.smoke else model_dir(args.model, out)
    results = {}
    names = [args.only] if args.only else (["check"] if args.check_pairs else []) + ["alignkit", "trl"]
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--model-path",
            path,
            "--data",
            str(data),
            *sys.argv[1:],
            "--out",
            str(out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        results[name] = json.loads(line[-1][len("RESULT ") :])
        r = results[name]
        if name == "check":
            print(
                f"log-prob agreement ({r['dtype']}, {r['pairs']} pairs, {2 * r['pairs']} sequences, same token ids): "
                f"mean |alignkit - TRL| = {r['mean_abs_diff']:.2e}, max {r['max_abs_diff']:.2e} "
                f"(mean |log-prob| {r['mean_abs_logp']:.1f}; {r['skipped_truncated']} pairs TRL would truncate left "
                "out); "
                f"against a float64 forward: alignkit {r['alignkit_vs_float64']:.2e}, TRL {r['trl_vs_float64']:.2e}",
                flush=True,
            )
            continue
        ref = f", of which reference {r['reference_seconds']:.1f} s" if "reference_seconds" in r else ""
        print(
            f"{name}: {r['tokens_per_s']:.0f} tokens/s over {r['steps']} steps ({r['seconds']:.1f} s{ref}), "
            f"peak memory {r['peak_memory_mb']:.0f} MB",
            flush=True,
        )
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    if "alignkit" in results and "trl" in results:
        a, t = results["alignkit"], results["trl"]
        print(
            f"tokens_per_s_ratio={a['tokens_per_s'] / t['tokens_per_s']:.2f} "
            f"peak_memory_ratio={a['peak_memory_mb'] / t['peak_memory_mb']:.2f}"
        )


if __name__ == "__main__":
    main()
