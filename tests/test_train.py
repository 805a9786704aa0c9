"""Trajectory-level tests of the training loop on a tiny random-init model."""

import json
import shutil

import pytest
import torch
from conftest import base_overrides, crash_after
from transformers import AutoModelForCausalLM

import alignkit.api
from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.train import checkpoint as ckpt
from alignkit.train import loop
from alignkit.train import steps as train_steps
from alignkit.train.metrics import read_metrics


def _cfg(tiny_model_dir, data, tmp_path, *extra, out="run"):
    return load_config(
        None,
        base_overrides(tiny_model_dir, data, tmp_path / out, tmp_path / "cache")
        + ["train.learning_rate=5e-3", "train.batch_size=4", "train.warmup_ratio=0", "data.eval_fraction=0.1", *extra],
    )


def test_dpo_widens_margin_and_logs_metrics(tiny_model_dir, pairs_file, tmp_path):
    result = loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=12"), progress=False)
    rows = read_metrics(result.run_dir, "train")
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in (
        "loss",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "lr",
        "grad_norm",
        "tokens_per_s",
    ):
        assert key in rows[-1], key
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference at step 1
    assert rows[-1]["rewards/margins"] > 1.0 and rows[-1]["loss"] < 0.4
    ev = read_metrics(result.run_dir, "eval")[-1]
    assert ev["step"] == 12 and ev["rewards/accuracies"] == 1.0 and ev["rewards/margins"] > 1.0


def test_sft_lowers_nll(tiny_model_dir, sft_file, tmp_path):
    cfg = _cfg(tiny_model_dir, sft_file, tmp_path, "recipe=sft", "train.max_steps=15", "train.learning_rate=1e-2")
    result = loop.train(cfg, progress=False)
    rows = read_metrics(result.run_dir, "train")
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    # Step 1, worked out with a plain float64 log-softmax of the initial model on the step's examples:
    # loss = the step's summed NLL / its completion tokens; nll_per_token = mean over examples of NLL / tokens.
    session = loop.setup(cfg, progress=False)
    first = train_steps.batch_plan(
        cfg, session.recipe, session.data.train, cfg.train.batch_size, cfg.train.shuffle
    ).micro_batch(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    nll, counts = [], []
    for it in (session.data.train[i] for i in first):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([it.prompt_ids + it.completion_ids])).logits[0].double(), -1)
        nll.append(-sum(float(lp[len(it.prompt_ids) + j - 1, t]) for j, t in enumerate(it.completion_ids)))
        counts.append(len(it.completion_ids))
    assert rows[0]["loss"] == pytest.approx(sum(nll) / sum(counts), abs=1e-6)
    assert rows[0]["nll_per_token"] == pytest.approx(sum(n / c for n, c in zip(nll, counts)) / len(nll), abs=1e-6)


def _final_params(run_dir):
    return AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()


def test_grad_accumulation_1x8_equals_8x1(tiny_model_dir, pairs_file, tmp_path):
    same = ["train.max_steps=3", "train.shuffle=false"]  # unshuffled: both see the same 8 pairs per step
    a = loop.train(
        _cfg(tiny_model_dir, pairs_file, tmp_path, "train.batch_size=8", "train.grad_accum=1", *same, out="a"),
        progress=False,
    )
    b = loop.train(
        _cfg(tiny_model_dir, pairs_file, tmp_path, "train.batch_size=1", "train.grad_accum=8", *same, out="b"),
        progress=False,
    )
    la, lb = read_metrics(a.run_dir, "train"), read_metrics(b.run_dir, "train")
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)  # float32 sums in another order
    pa, pb = _final_params(a.run_dir), _final_params(b.run_dir)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-5, rtol=0)


def test_resume_after_crash_matches_uninterrupted_run(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    steps = ["train.max_steps=6", "train.save_every=3", "train.eval_every=2"]
    full = loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, *steps, out="full"), progress=False)

    real_save = crash_after(monkeypatch, 3)
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, *steps, out="crashed")
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert ckpt.latest_checkpoint(cfg.output_dir).name == "checkpoint-3"
    resumed = loop.train(cfg, resume=True, progress=False)

    a, b = read_metrics(full.run_dir), read_metrics(resumed.run_dir)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]  # no duplicate lines
    assert abs(a[-1]["loss"] - b[-1]["loss"]) < 1e-6
    assert abs(full.train_metrics["loss"] - resumed.train_metrics["loss"]) < 1e-6
    pa, pb = _final_params(full.run_dir), _final_params(resumed.run_dir)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-6, rtol=0)


def test_resume_without_a_checkpoint_starts_from_scratch(tiny_model_dir, pairs_file, tmp_path, capsys):
    steps = ["train.max_steps=3"]
    fresh = loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, *steps, out="fresh"), progress=False)
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, *steps, out="never_saved")
    resumed = loop.train(cfg, resume=True, progress=False)  # nothing there yet: a first run
    assert "no checkpoint in" in capsys.readouterr().out
    assert [r["loss"] for r in read_metrics(resumed.run_dir, "train")] == pytest.approx(
        [r["loss"] for r in read_metrics(fresh.run_dir, "train")], abs=1e-6
    )


def test_checkpoints_are_complete_and_pruned(tiny_model_dir, pairs_file, tmp_path):
    cfg = _cfg(
        tiny_model_dir, pairs_file, tmp_path, "train.max_steps=5", "train.save_every=1", "train.keep_checkpoints=2"
    )
    result = alignkit.api.train(cfg, progress=False)  # the loop and then the report
    names = sorted(p.name for p in result.run_dir.iterdir())
    assert names == [
        "checkpoint-4",
        "checkpoint-5",
        "config.yaml",
        "final",
        "heldout.json",
        "metrics.jsonl",
        "report.html",
        "summary.json",
    ]
    c = result.run_dir / "checkpoint-5"
    for f in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "alignkit_config.yaml",
        "trainer_state.pt",
        "manifest.json",
    ):
        assert (c / f).is_file(), f
    listed = json.loads((c / "manifest.json").read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in c.iterdir() if p.name != "manifest.json")
    assert listed["model.safetensors"]["size"] == (c / "model.safetensors").stat().st_size
    assert ckpt.verify(c) is None
    assert json.loads((c / "trainer_state.json").read_text())["step"] == 5
    # the final directory loads as a plain transformers model and equals the last checkpoint
    final, last = _final_params(result.run_dir), AutoModelForCausalLM.from_pretrained(c).state_dict()
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    def write(tmp):
        (tmp / "half.bin").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.atomic_dir(tmp_path / "checkpoint-1", write)
    assert list(tmp_path.iterdir()) == []


def test_cached_reference_equals_live_and_is_reused(tiny_model_dir, pairs_file, tmp_path, capsys):
    cached = loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=4", out="c"), progress=False)
    live = loop.train(
        _cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=4", "reference=live", out="l"), progress=False
    )
    for a, b in zip(read_metrics(cached.run_dir), read_metrics(live.run_dir)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    capsys.readouterr()
    loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=1", out="again"), progress=False)
    assert "reusing cache" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) == 2  # train + eval tables


def test_lora_trains_adapters_only_and_exports_merged_model(tiny_model_dir, pairs_file, tmp_path):
    cfg = _cfg(
        tiny_model_dir,
        pairs_file,
        tmp_path,
        "lora.enabled=true",
        "lora.r=4",
        "train.max_steps=6",
        "train.learning_rate=2e-2",
        "reference=live",
    )
    result = loop.train(cfg, progress=False)
    rows = read_metrics(result.run_dir, "train")
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # adapters start at zero: policy == base
    assert rows[-1]["rewards/margins"] > 0.2
    assert (result.run_dir / "checkpoint-6" / "adapter_model.safetensors").is_file()
    merged = _final_params(result.run_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert set(merged) == set(base)
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert changed and all("proj" in k for k in changed)  # only adapted linear layers moved
    assert not any("embed" in k or "norm" in k for k in changed)


def test_lora_with_frozen_blocks_adapts_only_the_blocks_above(tiny_model_dir, pairs_file, tmp_path):
    """`model.freeze_layers` with LoRA: no adapters in the frozen blocks (peft would otherwise train
    them), so the merged model's bottom block is the base's; freezing every block is an error."""
    from alignkit.models import transformer_blocks

    args = ["lora.enabled=true", "lora.r=4", "train.max_steps=4", "train.learning_rate=2e-2", "reference=live"]
    result = loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, *args, "model.freeze_layers=1"), progress=False)
    merged, base = _final_params(result.run_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(".layers.1." in k and "proj" in k for k in changed)
    session = loop.setup(_cfg(tiny_model_dir, pairs_file, tmp_path, *args, "model.freeze_layers=1", out="s"))
    adapted = [n for n, p in session.model.named_parameters() if p.requires_grad]
    assert adapted and all(".layers.1." in n and "lora_" in n for n in adapted)
    assert len(adapted) == 14  # 7 linears of one block, A and B each
    # a named subset of the linears, and a regex, are filtered the same way
    for targets in ("[q_proj,v_proj]", r".*\.(q|v)_proj"):
        model = loop.setup(
            _cfg(
                tiny_model_dir,
                pairs_file,
                tmp_path,
                *args,
                "model.freeze_layers=1",
                f"lora.target_modules={targets}",
                out="t",
            )
        ).model
        names = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert names == {f"base_model.model.model.layers.1.self_attn.{m}" for m in ("q_proj", "v_proj")}
    n = len(transformer_blocks(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))
    with pytest.raises(ConfigError, match="LoRA would adapt nothing"):
        loop.setup(_cfg(tiny_model_dir, pairs_file, tmp_path, *args, f"model.freeze_layers={n}", out="all"))


def test_resume_with_lora(tiny_model_dir, pairs_file, tmp_path):
    args = ["lora.enabled=true", "lora.r=4", "train.max_steps=4", "train.save_every=2", "train.learning_rate=2e-2"]
    full = loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, *args, out="full"), progress=False)
    part = _cfg(tiny_model_dir, pairs_file, tmp_path, *args, out="part")
    loop.train(part, progress=False)
    shutil.rmtree(f"{part.output_dir}/checkpoint-4")  # as if it had stopped after step 2
    resumed = loop.train(part, resume=True, progress=False)
    assert abs(full.train_metrics["loss"] - resumed.train_metrics["loss"]) < 1e-6


def test_lr_schedule_shapes():
    f = [train_steps.lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3) and f[2] == 1.0
    assert f[-1] < 0.05 and all(a >= b for a, b in zip(f[2:], f[3:]))
    lin = [train_steps.lr_factor(s, 10, 0, "linear") for s in range(10)]
    assert lin[5] == pytest.approx(0.5)
    assert train_steps.lr_factor(7, 10, 0, "constant") == 1.0


def test_micro_batches_cover_each_epoch_once():
    plan = train_steps.BatchPlan([0] * 10, 3, seed=1)
    seen = [i for m in range(4) for i in plan.micro_batch(m)]
    assert sorted(seen) == list(range(10)) and plan.per_epoch == 4  # 3+3+3+1
    nxt = [i for m in range(4, 8) for i in plan.micro_batch(m)]
    assert sorted(nxt) == list(range(10)) and nxt != seen  # reshuffled


def test_token_budget_cuts_batches_in_order():
    plan = train_steps.BatchPlan([5, 3, 9, 2, 12, 4, 4], batch_size=1, max_tokens=10, shuffle=False)
    assert plan.epoch(0) == [[0, 1], [2], [3], [4], [5, 6]]  # 12 > 10 goes alone
    assert plan.over_budget == 1


def test_token_budget_epochs_are_covered_and_reproducible():
    tokens = [(7 * i) % 23 + 1 for i in range(50)]
    plan = train_steps.BatchPlan(tokens, batch_size=4, max_tokens=40, seed=3)
    steps = [plan.micro_batch(m) for m in range(3 * plan.per_epoch)]
    again = train_steps.BatchPlan(tokens, batch_size=4, max_tokens=40, seed=3)  # a resumed run's fresh plan
    assert [again.micro_batch(m) for m in reversed(range(len(steps)))] == steps[::-1]
    assert all(sum(tokens[i] for i in b) <= 40 for b in steps)
    first = [i for b in plan.epoch(0) for i in b]
    assert sorted(first) == list(range(50)) and sorted(i for b in plan.epoch(1) for i in b) == list(range(50))
    assert len(plan.epoch(0)) > 50 * 12 // 40  # mean 12 tokens: roughly 3 per batch, not batch_size 4


def test_training_by_token_budget(tiny_model_dir, pairs_file, tmp_path):
    cfg = _cfg(
        tiny_model_dir, pairs_file, tmp_path, "train.max_tokens_per_batch=60", "train.epochs=1", "train.log_every=1"
    )
    result = loop.train(cfg, progress=False)
    rows = read_metrics(result.run_dir, "train")
    session = loop.setup(cfg, progress=False)
    recipe, data = session.recipe, session.data
    plan = train_steps.batch_plan(cfg, recipe, data.train, 4, shuffle=True)
    assert len(rows) == result.steps == plan.per_epoch
    # every step's non-pad tokens (prompts once: packed) fit the budget, and the epoch covers the data
    assert all(r["tokens_computed"] <= 60 for r in rows)
    assert sum(r["tokens_computed"] for r in rows) == sum(
        len(it.prompt_ids) + len(it.chosen_ids) + len(it.rejected_ids) for it in data.train
    )


def test_gradient_checkpointing_gives_the_same_losses(tiny_model_dir, pairs_file, tmp_path):
    a = loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=3", out="a"), progress=False)
    b = loop.train(
        _cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=3", "model.gradient_checkpointing=true", out="b"),
        progress=False,
    )
    for ra, rb in zip(read_metrics(a.run_dir, "train"), read_metrics(b.run_dir, "train")):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)


def test_bf16_autocast_runs_and_stays_close_to_fp32(tiny_model_dir, pairs_file, tmp_path):
    a = loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=3", out="a"), progress=False)
    b = loop.train(
        _cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=3", "train.precision=bf16", out="b"), progress=False
    )
    la, lb = read_metrics(a.run_dir, "train"), read_metrics(b.run_dir, "train")
    # bf16 has an 8-bit mantissa: log-probs of ~-30 carry errors of ~0.1, so losses agree to ~1e-2
    assert all(abs(x["loss"] - y["loss"]) < 3e-2 for x, y in zip(la, lb))
    assert la[-1]["logps/chosen"] != lb[-1]["logps/chosen"]  # autocast really changed the arithmetic


def test_forward_pieces_leave_the_training_trajectory_unchanged(tiny_model_dir, pairs_file, tmp_path):
    """train.forward_tokens splits each micro-batch's forward/backward into pieces; the step's loss
    and update are the same as in one piece (float32: summation order only)."""
    whole = loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=4", out="whole"), progress=False)
    split = loop.train(
        _cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=4", "train.forward_tokens=40", out="split"),
        progress=False,
    )
    for a, b in zip(read_metrics(whole.run_dir, "train"), read_metrics(split.run_dir, "train")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["tokens"] == b["tokens"]
    pieces = train_steps.forward_pieces(
        [type("I", (), {"prompt_ids": [1] * 10, "chosen_ids": [2] * 5, "rejected_ids": [3] * 5})()] * 5, 40, shared=True
    )
    assert [len(p) for p in pieces] == [2, 2, 1]  # 20 tokens each, at most 40 per piece


def test_activation_offload_is_refused_on_a_cpu(tiny_model_dir, pairs_file, tmp_path):
    """Activations of a CPU run are in host memory already: the setting would do nothing."""
    from alignkit.errors import ConfigError
    from alignkit.train.session import place

    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, "train.activation_offload=true", "model.device=cpu")
    with pytest.raises(ConfigError, match="activation_offload.*host memory already"):
        place(cfg)


def test_the_demo_checks_its_overrides_before_it_runs(tmp_path):
    from alignkit.demo import run_demo
    from alignkit.errors import ConfigError

    with pytest.raises(ConfigError, match="lora.rank"):
        run_demo(output_dir=str(tmp_path / "demo"), overrides=["lora.rank=16"])
    assert not (tmp_path / "demo").exists()  # nothing ran
