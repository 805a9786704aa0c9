#!/usr/bin/env bash
# The GPU-only paths of alignkit, checked in one run on one CUDA GPU (under 8 minutes on an H200).
# Prints one summary line per check: `gpu_check <name>: ok ...` or `gpu_check <name>: FAILED ...`.
#
#   bash bench/gpu_check.sh            # from the repository root, on a machine with a CUDA GPU
#
# Needs torch with CUDA, transformers, peft, safetensors, pyyaml, tqdm, datasets; alignkit itself is
# put on PYTHONPATH from this checkout. trl==1.16.0 for the last check (skipped without it).
# Checks:
#   precision    train.precision auto picks bf16 autocast on the GPU and a DPO run trains in it
#   rng          CUDA RNG states are saved in checkpoints and restored on resume
#   fsdp         FSDP2 on CUDA with one process (torchrun, dist.strategy=fsdp, bf16 mixed precision)
#                agrees with the unsharded run on the same steps
#   vllm         GRPO with a colocated vLLM engine in bf16 (the trainer in fp32, online.tis_cap 2): it
#                sleeps while the trainer trains, takes each update, and sampler and trainer agree
#                (skipped when vllm is not installed: its CUDA wheel is too large to carry)
#   dpo_vs_trl   bench/dpo_vs_trl.py on the 360M shape (llama:960x32), pairs 8, max length 1024
#   async        one_step_off GRPO with the trainer and an `alignkit sample-serve` (and, when vllm is
#                installed, an `alignkit vllm-serve`) on the same GPU: it trains, every later rollout
#                is one version behind, and the first step's sampler and trainer agree; with 2 GPUs also
#                against `vllm-serve --weight-transport nccl` (weights broadcast through vLLM's NCCL engine)
#   sdpa_mask    which SDPA kernels take a packed batch's additive bf16 mask, and the memory one
#                attention forward+backward needs with it against plain causal attention
#   qlora        bench/memory.py's DPO step on the 360M shape (width 960, 32 layers, random init):
#                torch.cuda.max_memory_allocated of full, LoRA, QLoRA (nf4) and int8 at 1024 tokens
#   offload      train.activation_offload: a DPO run with activations in pinned host memory equals the
#                run without (same losses) and allocates less GPU memory at its peak
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_DIR:-/tmp/alignkit_gpu_check}
rm -rf "$WORK" && mkdir -p "$WORK"

$PY - "$WORK" <<'PYEOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import toy_pairs, write_jsonl
from alignkit.testing import save_tiny_model_dir
work = Path(sys.argv[1])
save_tiny_model_dir(work / "tiny", hidden=64, layers=4)
write_jsonl(work / "pairs.jsonl", toy_pairs(64))
PYEOF

COMMON="model.name_or_path=$WORK/tiny data.train=$WORK/pairs.jsonl cache_dir=$WORK/cache train.report_to=[] train.batch_size=8 train.learning_rate=5e-3 train.warmup_ratio=0 data.eval_fraction=0.1 train.shuffle=false"

# precision: auto -> bf16 on a GPU that supports it, and a run trains under it
$PY - "$WORK" $COMMON <<'PYEOF' && echo "gpu_check precision: ok" || echo "gpu_check precision: FAILED"
import sys, torch
from alignkit.config import load_config
from alignkit.train import loop
from alignkit.train.metrics import read_metrics
cfg = load_config(None, sys.argv[2:] + [f"output_dir={sys.argv[1]}/prec", "train.max_steps=6", "model.device=cuda"])
assert loop.resolve_precision(cfg, torch.device("cuda")) == "bf16", "auto should pick bf16 on this GPU"
rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
print("precision losses", [round(r["loss"], 4) for r in rows])
PYEOF

# rng: checkpoints carry the CUDA RNG and a resume restores it: resumed from the full run's checkpoint 3 (as after a
# crash there), a run ends where the full one does
$PY - "$WORK" $COMMON <<'PYEOF' && echo "gpu_check rng: ok" || echo "gpu_check rng: FAILED"
import sys, torch
from alignkit.config import load_config
from alignkit.train import checkpoint as ckpt, loop
args = sys.argv[2:] + ["train.max_steps=6", "train.save_every=3", "model.device=cuda", "train.precision=fp32"]
state = ckpt.rng_state()
assert "cuda" in state, "the CUDA RNG is not in the checkpoint state"
torch.cuda.manual_seed(123); ckpt.set_rng_state(state)
assert torch.equal(torch.cuda.get_rng_state(), state["cuda"][0])
full = loop.train(load_config(None, args + [f"output_dir={sys.argv[1]}/rng_full"]), progress=False)
cfg = load_config(None, args + [f"output_dir={sys.argv[1]}/rng_resume"])
saved = ckpt.load_trainer_state(full.run_dir / "checkpoint-3")
assert "cuda" in saved["rng"], "no CUDA RNG in the checkpoint"
loop.train(cfg, resume_from=str(full.run_dir / "checkpoint-3"), progress=False)
from safetensors.torch import load_file
a = load_file(f"{full.final_dir}/model.safetensors"); b = load_file(f"{cfg.output_dir}/final/model.safetensors")
diff = max(float((a[k] - b[k]).abs().max()) for k in a)
print("rng resume max |delta param|", diff)
assert diff < 1e-5, diff  # CUDA kernels may reorder sums between runs
PYEOF

# fsdp: FSDP2 on CUDA with one process, bf16 mixed precision, against the unsharded run
cat > "$WORK/fsdp_runs.json" <<EOF2
[{"argv": ["train", $(printf '"%s", ' $COMMON) "output_dir=$WORK/fsdp", "train.max_steps=6", "dist.strategy=fsdp", "model.device=cuda"]}]
EOF2
if timeout 300 $PY -m torch.distributed.run --standalone --nproc_per_node=1 tests/dist_driver.py "$WORK/fsdp_runs.json" > "$WORK/fsdp.log" 2>&1; then
  $PY - "$WORK" $COMMON <<'PYEOF' && echo "gpu_check fsdp: ok" || echo "gpu_check fsdp: FAILED"
import sys
from alignkit.config import load_config
from alignkit.train import loop
from alignkit.train.metrics import read_metrics
plain = loop.train(load_config(None, sys.argv[2:] + [f"output_dir={sys.argv[1]}/plain", "train.max_steps=6",
                                                     "model.device=cuda"]), progress=False)
a, b = read_metrics(plain.run_dir, "train"), read_metrics(f"{sys.argv[1]}/fsdp", "train")
diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
print("fsdp vs plain loss differences (bf16 autocast vs bf16 FSDP2 mixed precision)", [round(d, 5) for d in diffs])
assert max(diffs) < 2e-2, diffs  # bf16 compute on both sides, rounded differently
PYEOF
else
  echo "gpu_check fsdp: FAILED (torchrun; see $WORK/fsdp.log)"
  grep -v "Writing model shards\|Loading weights" "$WORK/fsdp.log" | grep -B2 -A12 -m1 "Traceback\|alignkit: error" | head -40
fi

# vllm: colocated engine on the GPU, bf16, sleeping between rollouts
if $PY -c "import vllm" 2>/dev/null; then
  timeout 300 $PY - "$WORK" <<'PYEOF' && echo "gpu_check vllm: ok" || echo "gpu_check vllm: FAILED"
import json, sys, torch
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import toy_pairs, write_jsonl
from alignkit.config import load_config
from alignkit.testing import save_tiny_model_dir
from alignkit.train import loop
from alignkit.train.metrics import read_metrics
work = Path(sys.argv[1])
if __name__ == "__main__":
    model = save_tiny_model_dir(work / "small", hidden=128, layers=2)  # vLLM's attention needs head size >= 32
    prompts = write_jsonl(work / "prompts.jsonl", [{"prompt": r["prompt"]} for r in toy_pairs(32)])
    (work / "r.py").write_text("def chars(prompts, completions, **c):\n    return [len(x) / 10 for x in completions]\n")
    cfg = load_config(None, [f"model.name_or_path={model}", f"data.train={prompts}", f"output_dir={work}/vllm",
                             f"cache_dir={work}/cache", "recipe=grpo", f"online.rewards={work}/r.py:chars",
                             "generation.backend=vllm", "generation.vllm_dtype=bfloat16", "online.tis_cap=2.0",
                             "generation.num_samples=4", "generation.max_new_tokens=16", "train.batch_size=4",
                             "train.max_steps=4", "train.precision=fp32", "model.device=cuda", "train.report_to=[]",
                             "data.eval_fraction=0"])
    rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
    print("vllm bf16 engine vs fp32 trainer: logprob_mismatch", [round(r["logprob_mismatch"], 4) for r in rows],
          "tis/weight_mean", [round(r["tis/weight_mean"], 4) for r in rows])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert max(r["logprob_mismatch"] for r in rows) < 0.1, "bf16 sampler far from the fp32 trainer"
PYEOF
else
  echo "gpu_check vllm: skipped (vllm is not installed)"
fi

# async: one_step_off against a sampler server on the GPU (alignkit's own; vLLM's when installed)
for SERVER in sample-serve vllm-serve vllm-serve-nccl; do
  if [ "$SERVER" != sample-serve ] && ! $PY -c "import vllm" 2>/dev/null; then
    echo "gpu_check async_$SERVER: skipped (vllm is not installed)"; continue
  fi
  # NCCL refuses two ranks on one GPU: the broadcast from the trainer to vLLM's worker needs two
  if [ "$SERVER" = vllm-serve-nccl ] && [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -lt 2 ]; then
    echo "gpu_check async_$SERVER: skipped (needs 2 GPUs: NCCL refuses two ranks on one device)"; continue
  fi
  timeout 400 $PY - "$WORK" "$SERVER" <<'PYEOF' && echo "gpu_check async_$SERVER: ok" || echo "gpu_check async_$SERVER: FAILED"
import os, socket, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import toy_pairs, write_jsonl
from alignkit.config import load_config
from alignkit.testing import save_tiny_model_dir
from alignkit.train import loop
from alignkit.train.metrics import read_metrics
work, server = Path(sys.argv[1]), sys.argv[2]
if __name__ == "__main__":
    model = save_tiny_model_dir(work / "async_model", hidden=128, layers=2)
    prompts = write_jsonl(work / "async_prompts.jsonl", [{"prompt": r["prompt"]} for r in toy_pairs(32)])
    (work / "r.py").write_text("def chars(prompts, completions, **c):\n    return [len(x) / 10 for x in completions]\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    extra = ["--device", "cuda"] if server == "sample-serve" else ["--gpu-memory-utilization", "0.3", "--dtype", "float32"]
    nccl = server == "vllm-serve-nccl"  # weights broadcast from the trainer's GPU 0 to vLLM's worker on GPU 1
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="1") if nccl else None
    proc = subprocess.Popen([sys.executable, "-m", "alignkit", server.removesuffix("-nccl"), "--model", str(model),
                             "--port", str(port), "--sync-dir", str(work / f"sync_{server}"), *extra,
                             *(["--weight-transport", "nccl"] if nccl else [])], env=env)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close(); break
            except OSError:
                assert proc.poll() is None, "the server stopped"; time.sleep(1)
        key = "generation.sampler_server" if server == "sample-serve" else "generation.vllm_server"
        backend = "transformers" if server == "sample-serve" else "vllm"
        cfg = load_config(None, [f"model.name_or_path={model}", f"data.train={prompts}", f"output_dir={work}/async_{server}",
                                 f"cache_dir={work}/cache", "recipe=grpo", f"online.rewards={work}/r.py:chars",
                                 f"generation.backend={backend}", f"{key}=http://127.0.0.1:{port}",
                                 f"generation.vllm_sync_dir={work}/sync_{server}", "online.async.mode=one_step_off",
                                 "generation.num_samples=4", "generation.max_new_tokens=16", "train.batch_size=4",
                                 "train.max_steps=4", "train.precision=fp32", "model.device=cuda", "train.report_to=[]",
                                 "data.eval_fraction=0", *(["generation.weight_transport=nccl"] if nccl else [])])
        rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
        print(server, "staleness", [r["async/staleness_mean"] for r in rows], "mismatch",
              [round(r["logprob_mismatch_max"], 5) for r in rows], "trainer idle",
              round(rows[-1]["async/trainer_idle_fraction"], 3))
        assert [r["async/staleness_mean"] for r in rows] == [0, 1, 1, 1]
        assert rows[0]["logprob_mismatch_max"] < 1e-2, "sampler and trainer disagree on the same weights"
    finally:
        proc.terminate(); proc.wait(timeout=60)
PYEOF
done

# dpo_vs_trl: throughput against TRL on the 360M shape
if $PY -c "import trl" 2>/dev/null; then
  timeout 300 $PY bench/dpo_vs_trl.py --device cuda --model llama:960x32 --pairs-per-step 8 --max-length 1024 \
    --steps 10 --warmup 2 2>&1 | tail -3 | sed 's/^/gpu_check dpo_vs_trl: /'
else
  echo "gpu_check dpo_vs_trl: skipped (trl==1.16.0 is not installed)"
fi

# sdpa_mask: a packed batch's attention (one [R, 1, T, T] additive bf16 mask) against causal attention
$PY - <<'PYEOF' && echo "gpu_check sdpa_mask: ok" || echo "gpu_check sdpa_mask: FAILED"
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
R, H, T, D = 2, 15, 2048, 64  # the 360M shape's heads and head size, two packed rows of 2048 tokens
q, k, v = (torch.randn(R, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
allowed = torch.ones(T, T, dtype=torch.bool, device="cuda").tril()
allowed[T // 2:, : T // 2] = False  # two sequences per row
mask = torch.zeros(R, 1, T, T, dtype=torch.bfloat16, device="cuda").masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
def peak(backends, **kw):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    try:
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, k, v, **kw).sum().backward()
    except RuntimeError as e:
        return f"refused ({str(e).splitlines()[0][:60]})"
    torch.cuda.synchronize()
    return f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MB"
print("causal, flash:", peak([SDPBackend.FLASH_ATTENTION], is_causal=True))
for name, b in [("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]:
    print(f"additive mask, {name}:", peak([b], attn_mask=mask))
print("additive mask, default choice:", peak([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH], attn_mask=mask))
PYEOF

# dpo_vs_trl with smaller packed rows: alignkit alone, its peak memory against the default 2048-token rows
if $PY -c "import trl" 2>/dev/null; then
  timeout 200 $PY bench/dpo_vs_trl.py --device cuda --model llama:960x32 --pairs-per-step 8 --max-length 1024 \
    --steps 10 --warmup 2 --only alignkit --pack-tokens 1024 2>&1 | grep "tokens/s" | sed 's/^/gpu_check dpo_pack1024: /'
fi

# qlora: the memory of one DPO step, full / LoRA / QLoRA / int8, on the 360M shape
$PY -c "from alignkit.testing import save_tiny_model_dir; save_tiny_model_dir('$WORK/m360', hidden=960, layers=32)"
timeout 300 $PY bench/memory.py --model "$WORK/m360" --recipes dpo --skip-context --seq 1024 --batch 4 --modes full,lora,qlora,int8 \
  --out "$WORK/memory" 2>&1 | grep -E "^dpo|_vs_lora" | sed 's/^/gpu_check qlora: /'

# offload: activations in pinned host memory between forward and backward
$PY - "$WORK" $COMMON <<'PYEOF' && echo "gpu_check offload: ok" || echo "gpu_check offload: FAILED"
import sys, torch
from alignkit.config import load_config
from alignkit.train import loop
from alignkit.train.metrics import read_metrics
peaks, losses = {}, {}
for offload in (False, True):
    extra = [f"output_dir={sys.argv[1]}/offload-{offload}", "train.max_steps=3", "model.device=cuda",
             "model.gradient_checkpointing=true", f"train.activation_offload={str(offload).lower()}"]
    torch.cuda.reset_peak_memory_stats()
    rows = read_metrics(loop.train(load_config(None, sys.argv[2:] + extra), progress=False).run_dir, "train")
    peaks[offload], losses[offload] = torch.cuda.max_memory_allocated() / 2**20, [r["loss"] for r in rows]
print("offload peak MiB", peaks, "losses", losses)
assert all(abs(a - b) < 1e-4 for a, b in zip(losses[False], losses[True])), losses
PYEOF
