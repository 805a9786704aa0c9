"""The training health monitor: every rule fires on a synthetic metric stream that shows its
problem (at the step and with the evidence worked out by hand) and stays silent on a near miss;
alerts are raised once; `train.stop_on` stops a real run with a checkpoint; a real GRPO run that
over-optimises raises the over-optimisation alert; alerts reach metrics.jsonl and the report."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import base_overrides, torchrun, toy_pairs, write_jsonl

import alignkit.api
from alignkit.cli import main
from alignkit.config import HealthConfig, load_config
from alignkit.errors import ConfigError
from alignkit.train import health
from alignkit.train.health import LN2, RULES, HealthMonitor, ln2_loss_keys


def stream(rows, ln2_keys=(), **thresholds):
    """Feed (step, split, metrics) rows to a fresh monitor; return every alert it raised."""
    monitor = HealthMonitor(HealthConfig(**thresholds), ln2_keys)
    return [a for step, split, row in rows for a in monitor.check(step, row, split)]


def train_rows(key, values, start=1, **also):
    return [(start + i, "train", {key: v, **also}) for i, v in enumerate(values)]


def only(alerts, rule):
    assert [a.rule for a in alerts] == [rule], [a.line() for a in alerts]
    return alerts[0]


# -- loss_stuck_at_ln2 ------------------------------------------------------------------------


def test_loss_stuck_at_ln2():
    wobble = [LN2 + 0.004 * (-1) ** s for s in range(1, 13)]  # mean of any 5 in a row within 0.004 of ln 2
    a = only(stream(train_rows("loss", wobble), ("loss",), warmup_steps=10, window=5), "loss_stuck_at_ln2")
    assert a.step == 10 and a.seen_in == "train"  # the first step at or after warm-up with 5 rows
    assert a.evidence["mean"] == pytest.approx(LN2 + 0.004 / 5, abs=1e-6)  # steps 6..10: three +, two -
    assert a.evidence["rows"] == 5 and a.evidence["from_step"] == 6


def test_loss_stuck_at_ln2_near_misses():
    learning = [LN2 - 0.011] * 12  # 0.011 from ln 2: outside the 0.01 tolerance
    assert stream(train_rows("loss", learning), ("loss",), warmup_steps=10, window=5) == []
    assert stream(train_rows("loss", [LN2] * 9), ("loss",), warmup_steps=10, window=5) == []  # still warming up
    assert stream(train_rows("loss", [LN2] * 12), (), warmup_steps=10, window=5) == []  # not a DPO-family loss


def test_ln2_losses_are_the_registered_losses_at_ln2_when_the_policy_is_the_reference():
    from alignkit import losses

    at_ln2 = set()
    for spec in losses.available():
        if spec.data != "paired":
            continue
        x = torch.full((3,), -5.0, dtype=torch.float64)
        inputs = {
            "policy_chosen_logps": x,
            "policy_rejected_logps": x,
            "ref_chosen_logps": x,
            "ref_rejected_logps": x,
            "chosen_counts": torch.full((3,), 4.0, dtype=torch.float64),
            "rejected_counts": torch.full((3,), 4.0, dtype=torch.float64),
            "reward_shift": torch.tensor(0.0, dtype=torch.float64),
        }
        per_example, _ = spec.fn(*(inputs[n] for n in spec.inputs), **spec.params)
        if torch.allclose(per_example, torch.full_like(per_example, math.log(2)), atol=1e-12):
            at_ln2.add(spec.name)
    assert at_ln2 == set(health.LN2_LOSSES)
    assert ln2_loss_keys({"name": "dpo"}, []) == ("loss",)
    assert ln2_loss_keys({"name": "ipo"}, []) == ()
    assert ln2_loss_keys({"name": "dpo"}, [{"name": "dpo", "weight": 1.0}, {"name": "sft", "weight": 0.2}]) == (
        "loss/dpo",
    )
    assert ln2_loss_keys({"name": "dpo"}, [{"name": "cdpo"}]) == ("loss",)
    assert ln2_loss_keys({"name": "dpo"}, [{"name": "dpo", "weight": 0.5}]) == ()  # its loss is 0.5 ln 2


# -- likelihood_displacement ------------------------------------------------------------------


def displacement_rows(chosen_step: float, margin_step: float, n: int = 12):
    return [
        (s, "train", {"logps/chosen": -40.0 + chosen_step * s + 0.05 * (-1) ** s, "rewards/margins": margin_step * s})
        for s in range(1, n + 1)
    ]


def test_likelihood_displacement():
    a = only(stream(displacement_rows(-0.5, 0.1), window=10), "likelihood_displacement")
    assert a.step == 10  # the first full window
    # steps 1..10: slope -0.5 plus an alternating +-0.05; the least-squares line worked out directly
    xs = list(range(1, 11))
    ys = [-40.0 - 0.5 * s + 0.05 * (-1) ** s for s in xs]
    mx, my = sum(xs) / 10, sum(ys) / 10
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    assert a.evidence["chosen_drop"] == pytest.approx(-slope * 9, abs=1e-6)
    assert a.evidence["chosen_drop"] == pytest.approx(4.5, abs=0.05)
    assert a.evidence["chosen_r"] < -0.99 and a.evidence["margins_r"] == pytest.approx(1.0)


def test_likelihood_displacement_near_misses():
    assert stream(displacement_rows(-0.2, 0.1), window=10) == []  # falls 1.8 nats over the window, not 2
    assert stream(displacement_rows(-0.5, -0.1), window=10) == []  # margins fall too: the model just gets worse
    assert stream(displacement_rows(-0.5, 0.1, n=9), window=10) == []  # not a full window yet


# -- over_optimisation ------------------------------------------------------------------------


def test_over_optimisation_by_kl_budget():
    a = only(stream(train_rows("kl", [0.03 * s for s in range(1, 9)]), smooth=3, kl_budget=0.1), "over_optimisation")
    assert a.step == 5  # mean of 0.09, 0.12, 0.15 = 0.12 > 0.1; at step 4 it is 0.09
    assert a.evidence["kl"] == pytest.approx(0.12) and a.evidence["kl_budget"] == 0.1
    assert stream(train_rows("kl", [0.09] * 20), smooth=3, kl_budget=0.1) == []


def proxy_rows(heldout_key, heldout, proxy_key="reward", proxy_step=0.1):
    rows = []
    for s in range(1, 31):
        rows.append((s, "train", {proxy_key: proxy_step * s}))
        if s % 10 == 0:
            rows.append((s, "eval", {heldout_key: heldout[s // 10 - 1]}))
    return rows


def test_over_optimisation_by_proxy_rising_and_heldout_falling():
    a = only(stream(proxy_rows("reward", [0.5, 0.4, 0.3]), smooth=2, eval_trend=2), "over_optimisation")
    assert (a.step, a.seen_in) == (30, "eval")
    assert a.evidence["heldout_values"] == [0.5, 0.4, 0.3] and a.evidence["eval_steps"] == [10, 20, 30]
    assert a.evidence["proxy_first"] == pytest.approx(0.95) and a.evidence["proxy_last"] == pytest.approx(2.95)
    # the DPO family: the train margin is the proxy, held-out preference accuracy what it should raise
    a = only(
        stream(proxy_rows("rewards/accuracies", [0.8, 0.7, 0.6], "rewards/margins"), smooth=2, eval_trend=2),
        "over_optimisation",
    )
    assert a.evidence["proxy"] == "rewards/margins" and a.evidence["heldout"] == "rewards/accuracies"
    # a win rate in the eval rows counts as the held-out side of the reward
    assert only(stream(proxy_rows("win_rate", [0.7, 0.6, 0.55]), smooth=2, eval_trend=2), "over_optimisation")


def test_over_optimisation_proxy_near_misses():
    assert stream(proxy_rows("reward", [0.5, 0.4, 0.45]), smooth=2, eval_trend=2) == []  # held-out recovered
    assert stream(proxy_rows("reward", [0.5, 0.4, 0.3], proxy_step=-0.1), smooth=2, eval_trend=2) == []  # proxy fell
    assert stream(proxy_rows("reward", [0.5, 0.4, 0.3]), smooth=2, eval_trend=3) == []  # 2 falls, 3 asked


# -- entropy_collapse -------------------------------------------------------------------------


def test_entropy_collapse():
    a = only(stream(train_rows("entropy", [2.0, 2.0, 2.0, 1.2, 0.6, 0.3, 0.2, 0.2]), smooth=3), "entropy_collapse")
    # start 2.0; step 6: (1.2 + 0.6 + 0.3) / 3 = 0.7; step 7: (0.6 + 0.3 + 0.2) / 3 = 0.367 < 0.2 x 2.0
    assert a.step == 7
    assert a.evidence["entropy"] == pytest.approx(1.1 / 3) and a.evidence["entropy_start"] == pytest.approx(2.0)
    a = only(stream(train_rows("entropy", [0.03] * 5), smooth=3), "entropy_collapse")  # below the floor at once
    assert a.step == 3 and a.evidence["entropy"] == pytest.approx(0.03)


def test_entropy_collapse_near_miss():
    fell_75 = [2.0, 2.0, 2.0, 1.0, 0.5, 0.5, 0.5, 0.5]  # 75% below the start; 80% asked
    assert stream(train_rows("entropy", fell_75), smooth=3) == []


# -- runaway_length ---------------------------------------------------------------------------


def test_runaway_length():
    lengths = [10, 10, 10, 12, 15, 18, 22, 25]
    a = only(stream(train_rows("completion_length", lengths, stopped_fraction=0.25), smooth=3), "runaway_length")
    assert a.step == 8  # (18 + 22 + 25) / 3 = 21.67 >= 2 x 10; at step 7 it is 18.33
    assert a.evidence["growth"] == pytest.approx(65 / 30) and a.evidence["stopped_fraction"] == pytest.approx(0.25)
    assert stream(train_rows("completion_length", [10, 10, 10, 14, 18, 18, 18, 18]), smooth=3) == []  # 1.8x
    # a reasoning model: the total barely moves while the reasoning grows at the answer's expense
    reasoning, answer = [10, 10, 10, 12, 15, 18, 22, 25], [90, 90, 90, 88, 85, 82, 78, 75]
    rows = [
        (step, split, {**row, "reasoning_length": float(x), "answer_length": float(y)})
        for (step, split, row), x, y in zip(train_rows("completion_length", [100.0] * 8), reasoning, answer)
    ]
    a = only(stream(rows, smooth=3), "runaway_length")
    assert a.step == 8 and a.evidence["length"] == "reasoning" and a.evidence["growth"] == pytest.approx(65 / 30)
    assert "mean reasoning length is 21.67" in a.line()


# -- zero_variance_groups ---------------------------------------------------------------------


def test_zero_variance_groups():
    a = only(stream(train_rows("zero_variance_groups", [0.25, 0.5, 0.75, 0.75, 1.0]), smooth=3), "zero_variance_groups")
    assert a.step == 4 and a.evidence["zero_variance_groups"] == pytest.approx(2 / 3)  # step 3: exactly 0.5
    assert stream(train_rows("zero_variance_groups", [0.5] * 10), smooth=3) == []  # half is not most


# -- logprob_mismatch -------------------------------------------------------------------------


def test_logprob_mismatch():
    rows = [
        (s, "train", {"logprob_mismatch": v, "logprob_mismatch_max": 4 * v})
        for s, v in enumerate([0.01, 0.01, 0.08, 0.09], 1)
    ]
    a = only(stream(rows, smooth=2), "logprob_mismatch")
    assert a.step == 4 and a.evidence["logprob_mismatch"] == pytest.approx(0.085)  # step 3: 0.045
    assert a.evidence["logprob_mismatch_max"] == pytest.approx(0.36)
    assert stream(train_rows("logprob_mismatch", [0.04] * 10), smooth=2) == []


def test_logprob_mismatch_ignores_rows_sampled_by_older_weights():
    rows = [(s, "train", {"logprob_mismatch": 0.3, "async/staleness_max": 1.0}) for s in range(1, 8)]
    assert stream(rows, smooth=2) == []  # the asynchronous gap is off_policy_drift's to judge
    rows[5][2]["async/staleness_max"] = rows[6][2]["async/staleness_max"] = 0.0  # on-policy rows count again
    assert only(stream(rows, smooth=2), "logprob_mismatch").step == 7


# -- off_policy_drift -------------------------------------------------------------------------


def test_off_policy_drift_by_staleness():
    a = only(stream(train_rows("async/staleness_mean", [1.0, 2.0, 3.0, 3.0]), smooth=2), "off_policy_drift")
    assert a.step == 3 and a.evidence["async/staleness_mean"] == pytest.approx(2.5)  # step 2: exactly 1.5
    assert stream(train_rows("async/staleness_mean", [2.0] * 8), smooth=2) == []  # at the limit, not above


def test_off_policy_drift_by_importance_weights():
    a = only(stream(train_rows("tis/weight_mean", [1.0, 0.9, 0.6, 0.6]), smooth=2), "off_policy_drift")
    assert a.step == 3 and a.evidence["tis/weight_mean"] == pytest.approx(0.75)  # step 2: 0.95
    assert stream(train_rows("tis/weight_mean", [1.15] * 8), smooth=2) == []
    m = only(stream(train_rows("mis/masked_fraction", [0.05, 0.2, 0.2]), smooth=2), "off_policy_drift")
    assert m.step == 2 and m.evidence["mis/masked_fraction"] == pytest.approx(0.125)
    assert stream(train_rows("mis/masked_fraction", [0.1] * 8), smooth=2) == []


# -- grad_norm_spike --------------------------------------------------------------------------


def test_grad_norm_spike():
    a = only(
        stream(train_rows("grad_norm", [1.0, 1.2, 0.9, 1.1, 1.0, 15.0, 1.0]), smooth=3, window=10), "grad_norm_spike"
    )
    assert a.step == 6 and a.evidence["median_before"] == pytest.approx(1.0) and a.evidence["ratio"] == 15.0


def test_grad_norm_spike_near_misses():
    assert stream(train_rows("grad_norm", [1.0, 1.2, 0.9, 1.1, 1.0, 9.0]), smooth=3, window=10) == []  # 9x, 10x asked
    assert stream(train_rows("grad_norm", [1.0, 1.0, 15.0]), smooth=3, window=10) == []  # two steps of history only


# -- eval_loss_rising -------------------------------------------------------------------------


def test_eval_loss_rising():
    rows = [(10 * (i + 1), "eval", {"loss": v}) for i, v in enumerate([0.6, 0.55, 0.57, 0.6, 0.64])]
    a = only(stream(rows, eval_trend=3), "eval_loss_rising")
    assert (a.step, a.seen_in) == (50, "eval")
    assert a.evidence["eval_loss"] == [0.55, 0.57, 0.6, 0.64] and a.evidence["eval_steps"] == [20, 30, 40, 50]
    rows = [(10 * (i + 1), "eval", {"loss": v}) for i, v in enumerate([0.6, 0.55, 0.57, 0.6, 0.59])]
    assert stream(rows, eval_trend=3) == []
    # train losses rising are not eval losses
    assert stream(train_rows("loss", [0.1, 0.2, 0.3, 0.4, 0.5]), eval_trend=3) == []


# -- the monitor ------------------------------------------------------------------------------


def test_each_alert_is_raised_once_until_its_rule_clears():
    kl = [0.5] * 10 + [0.01] * 3 + [0.5] * 5 + [0.01] * 12 + [0.5] * 5  # clear for 3 rows, then for 12
    alerts = stream(train_rows("kl", kl), smooth=1, kl_budget=0.1, clear_rows=10)
    assert [(a.rule, a.step) for a in alerts] == [("over_optimisation", 1), ("over_optimisation", 31)]


def test_rows_without_a_rules_metrics_check_nothing():
    monitor = HealthMonitor(HealthConfig(smooth=1), ("loss",))
    for s in range(1, 30):
        assert monitor.check(s, {"loss": 0.3, "lr": 1e-5, "tokens_per_s": 100.0}, "train") == []
    assert monitor.active == {} and set(monitor.history.series["train"]) == {"loss"}
    assert monitor.check(30, {"kl": float("nan"), "entropy": None}, "train") == []  # non-finite: not recorded
    assert "kl" not in monitor.history.series["train"]
    assert HealthMonitor(HealthConfig(enabled=False, smooth=1)).check(1, {"kl": 9.0}, "train") == []


def test_monitor_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    rows = train_rows("kl", [0.5] * 6 + [0.01] * 4 + [0.5] * 3) + train_rows("entropy", [2.0] * 3 + [0.1] * 10)
    rows.sort(key=lambda r: r[0])
    cfg = HealthConfig(smooth=2, kl_budget=0.1, clear_rows=3)
    whole = HealthMonitor(cfg)
    expected = [(a.rule, a.step) for s, sp, r in rows for a in whole.check(s, r, sp)]
    first = HealthMonitor(cfg)
    got = [(a.rule, a.step) for s, sp, r in rows[:9] for a in first.check(s, r, sp)]
    torch.save({"state": {"health": first.state_dict()}}, tmp_path / "t.pt")
    state = torch.load(tmp_path / "t.pt", weights_only=True)["state"]["health"]
    second = HealthMonitor(cfg)
    second.load_state_dict(state)
    got += [(a.rule, a.step) for s, sp, r in rows[9:] for a in second.check(s, r, sp)]
    assert got == expected and len(expected) >= 3


def test_every_rule_is_documented_and_registered_once():
    for name, r in RULES.items():
        doc = r.fn.__doc__ or ""
        assert "Why:" in doc and "Condition" in doc, name
        assert r.advice and r.reads, name
        for key in re.findall(r"health\.(\w+)", doc):
            assert hasattr(HealthConfig(), key), (name, key)


def test_stop_on_names_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match="over_optimisation") as e:
        load_config(None, ["train.stop_on=[over_optimization]"])
    for name in RULES:
        assert name in str(e.value)
    with pytest.raises(ConfigError, match="health.enabled"):
        load_config(None, ["health.enabled=false", "train.stop_on=[grad_norm_spike]"])
    with pytest.raises(ConfigError, match="health.entropy_fall"):
        load_config(None, ["health.entropy_fall=1.5"])
    assert load_config(None, ["train.stop_on=[over_optimisation, eval_loss_rising]"]).train.stop_on == [
        "over_optimisation",
        "eval_loss_rising",
    ]


def test_the_docs_list_every_rule_with_its_default():
    section = (Path(__file__).resolve().parents[1] / "docs" / "health.md").read_text()
    for name in RULES:
        assert f"`{name}`" in section, name
    for key, value in vars(HealthConfig()).items():
        if key != "enabled":
            assert f"`health.{key}` ({value})" in section or f"`health.{key}`={value}" in section, key


# -- real runs --------------------------------------------------------------------------------


def strict_rows(run_dir):
    """metrics.jsonl parsed as strict JSON (NaN / Infinity literals rejected)."""

    def refuse(c):
        raise ValueError(f"non-standard JSON constant {c}")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln, parse_constant=refuse) for ln in lines if ln.strip()]


def test_stop_on_stops_a_real_run_with_a_checkpoint_and_resume_goes_on(tiny_model_dir, pairs_file, tmp_path, capsys):
    """DPO at a learning rate of 1e-12 leaves the policy at the reference, so its loss stays at ln 2:
    with a 3-step warm-up and window, loss_stuck_at_ln2 alerts at step 3 and `train.stop_on` stops
    the run there. A resume goes on to the end without raising that alert again."""
    out = tmp_path / "run"
    args = [
        "train",
        *base_overrides(tiny_model_dir, pairs_file, out, tmp_path / "cache"),
        "train.learning_rate=1e-12",
        "train.max_steps=8",
        "train.batch_size=4",
        "health.warmup_steps=3",
        "health.window=3",
        "train.stop_on=[loss_stuck_at_ln2]",
    ]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out.count("health alert at step 3: loss_stuck_at_ln2") == 1
    assert "train.stop_on: health rule `loss_stuck_at_ln2` alerted at step 3" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped_by_health" and summary["steps"] == 3
    assert summary["alert"]["rule"] == "loss_stuck_at_ln2" and summary["alert"]["step"] == 3
    assert summary["alert"]["evidence"]["mean"] == pytest.approx(LN2, abs=1e-5)
    assert (out / "checkpoint-3" / "manifest.json").is_file() and not (out / "final").exists()
    rows = strict_rows(out)
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    alerts = [r for r in rows if r["split"] == "alert"]
    assert len(alerts) == 1 and alerts[0]["step"] == 3 and alerts[0]["level"] == "error"
    assert set(alerts[0]) == {"step", "split", "rule", "seen_in", "level", "message", "evidence", "advice"}
    html = (out / "report.html").read_text()
    assert 'data-plot="health"' in html and "<code>loss_stuck_at_ln2</code>" in html
    assert "The run stopped at step 3 on the alert of <code>loss_stuck_at_ln2</code>" in html

    assert main([*args, "--resume"]) == 0
    assert "health alert" not in capsys.readouterr().out
    rows = strict_rows(out)
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))
    assert [(r["rule"], r["step"]) for r in rows if r["split"] == "alert"] == [("loss_stuck_at_ln2", 3)]
    assert json.loads((out / "summary.json").read_text())["status"] == "finished" and (out / "final").is_dir()


def test_every_process_stops_at_the_same_step(tiny_model_dir, pairs_file, tmp_path):
    """The stop above on 2 processes (torchrun, FSDP2 on gloo): every process runs the monitor and
    takes the main process's decision, so both stop at step 3 with one sharded checkpoint, instead of
    one waiting for the other until `dist.timeout_s`."""
    out = tmp_path / "run"
    argv = [
        "train",
        *base_overrides(tiny_model_dir, pairs_file, out, tmp_path / "cache"),
        "train.learning_rate=1e-12",
        "train.max_steps=8",
        "train.batch_size=2",
        "health.warmup_steps=3",
        "health.window=3",
        "train.stop_on=[loss_stuck_at_ln2]",
        "dist.timeout_s=60",
    ]
    proc = torchrun([{"argv": argv}], tmp_path, timeout=300)
    # Both processes exit with 2 (torchrun may end the slower one first: its files are written by then)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert re.search(
        r"error \(process [01]\): train\.stop_on: health rule `loss_stuck_at_ln2` alerted at step 3", proc.stderr
    ), proc.stderr[-3000:]
    assert proc.stdout.count("health alert at step 3") == 1  # printed by the main process only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped_by_health" and summary["steps"] == 3
    assert (out / "checkpoint-3" / "dcp").is_dir() and (out / "checkpoint-3" / "manifest.json").is_file()
    assert not (out / "final").exists()
    assert [(r["rule"], r["step"]) for r in strict_rows(out) if r["split"] == "alert"] == [("loss_stuck_at_ln2", 3)]


REWARD = '''
def yes_share(prompts, completions, **columns):
    """Share of the completion's words that are "yes": a reward a tiny model games fast."""
    return [c.split().count("yes") / max(1, len(c.split())) for c in completions]
'''


def test_a_real_grpo_run_driven_to_over_optimise_raises_the_alert(tiny_model_dir, tmp_path, capsys):
    """GRPO on a tiny random model, rewarded for the share of "yes" in its replies (a reward it can
    game by saying nothing else), at a learning rate of 3e-2 with a KL coefficient of 1e-3: the
    coefficient is too small to hold the policy, so the per-token KL to the reference (logged because
    a reference is kept) grows from 0 to well above 1 within 8 steps while the reward climbs. With
    `health.kl_budget=0.3` the over-optimisation rule must fire at the first step where the mean of
    the last two logged KL values passes 0.3, recomputed here from metrics.jsonl. Chosen over DPO
    because the KL here is the policy's own KL on its samples, the quantity the budget is about, and
    the run takes about a second on a CPU."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in toy_pairs(48)])
    (tmp_path / "rewards.py").write_text(REWARD)
    out = tmp_path / "grpo"
    cfg = load_config(
        None,
        base_overrides(tiny_model_dir, prompts, out, tmp_path / "cache")
        + [
            "recipe=grpo",
            f"online.rewards={tmp_path / 'rewards.py'}:yes_share",
            "generation.num_samples=8",
            "generation.max_new_tokens=8",
            "train.batch_size=4",
            "train.warmup_ratio=0",
            "train.learning_rate=3e-2",
            "train.lr_schedule=constant",
            "data.eval_fraction=0.25",
            "train.max_steps=8",
            "online.kl_coef=0.001",
            "health.kl_budget=0.3",
            "health.smooth=2",
        ],
    )
    result = alignkit.api.train(cfg, progress=False)
    rows = strict_rows(out)
    train = [r for r in rows if r["split"] == "train"]
    means = [(b["step"], (a["kl"] + b["kl"]) / 2) for a, b in zip(train, train[1:])]
    expected = next(s for s, m in means if m > 0.3)
    # (the early rollouts, where few samples say "yes", also raise zero_variance_groups)
    alerts = [r for r in rows if r["split"] == "alert" and r["rule"] == "over_optimisation"]
    assert [(a["rule"], a["step"]) for a in alerts] == [("over_optimisation", expected)]
    assert alerts[0]["evidence"]["kl"] == pytest.approx(dict(means)[expected], abs=1e-6)
    assert alerts[0]["evidence"]["kl_budget"] == 0.3 and alerts[0]["level"] == "warn"
    assert train[-1]["kl"] > 1.0 and train[-1]["reward"] > train[0]["reward"] + 0.3  # it did over-optimise
    assert capsys.readouterr().out.count(f"health alert at step {expected}: over_optimisation") == 1
    assert json.loads((out / "summary.json").read_text())["status"] == "finished" and result.final_dir.is_dir()
    html = (out / "report.html").read_text()
    assert 'data-plot="health"' in html and "<code>over_optimisation</code>" in html and "kl_budget = 0.3" in html


def test_every_rule_name_config_accepts_is_a_rule_the_monitor_runs():
    """`train.stop_on` is validated against alignkit.registries.health (below config); the rules
    themselves live in alignkit.train.health under the same names."""
    from alignkit.registries.health import RULE_NAMES

    assert sorted(RULES) == sorted(RULE_NAMES)


def test_over_optimisation_when_an_ensemble_stops_agreeing():
    std = [0.1, 0.1, 0.1, 0.12, 0.15, 0.18, 0.22, 0.25]
    a = only(stream(train_rows("reward/ensemble_std", std), smooth=3), "over_optimisation")
    assert a.step == 8  # (0.18 + 0.22 + 0.25) / 3 = 0.2167 >= 2 x 0.1; at step 7 it is 0.1833
    assert a.evidence["ensemble_std_start"] == pytest.approx(0.1)
    assert stream(train_rows("reward/ensemble_std", [0.1, 0.1, 0.1, 0.14, 0.18, 0.18, 0.18, 0.18]), smooth=3) == []
