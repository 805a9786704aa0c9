"""Weak-to-strong (alignkit w2s): the confidence loss against the paper's formula (values and
gradients by hand), soft Bradley-Terry, PGR and the deception splits on correctness worked out by
hand, the `prob` soft label's validation, and the whole protocol on tiny models whose weak model is
blind to the task by construction."""

import json
import math
import re

import numpy as np
import pytest
import torch
import yaml
from conftest import write_jsonl

from alignkit.data.readers import RecordError
from alignkit.errors import ConfigError
from alignkit.eval import weak_to_strong as W
from alignkit.losses.reward import bradley_terry, soft_bradley_terry, w2s_confidence


def sig(x):
    return 1 / (1 + math.exp(-x))


def ce(z, p):
    return -(p * math.log(sig(z)) + (1 - p) * math.log(sig(-z)))


def test_confidence_loss_values_and_gradients_by_hand():
    z = [2.0, 0.0, -1.0, 1.0]
    chosen = torch.tensor([[v] for v in z], dtype=torch.float64, requires_grad=True)
    rejected = torch.zeros(4, 1, dtype=torch.float64)
    probs = torch.tensor([0.8, 0.3, 0.6, 0.5], dtype=torch.float64)
    # progress 0.1 of training, warm-up 0.2: a = 0.75 * 0.1 / 0.2 = 0.375. The weak labels' mean is
    # 0.55, so the threshold is the 0.45 quantile of z, 0 + 0.35 * (1 - 0) = 0.35 (linear between the
    # sorted z[1] = 0 and z[2] = 1 at position 3 * 0.45 = 1.35): the hardened labels are [1, 0, 0, 1].
    a, hard = 0.375, [1, 0, 0, 1]
    losses, metrics = w2s_confidence(chosen, rejected, probs, 0.1, alpha=0.75, warmup=0.2)
    want = [(1 - a) * ce(zi, pi) + a * ce(zi, hi) for zi, pi, hi in zip(z, probs.tolist(), hard)]
    assert losses.tolist() == pytest.approx(want, abs=1e-12)
    losses.sum().backward()
    grad = [(1 - a) * (sig(zi) - pi) + a * (sig(zi) - hi) for zi, pi, hi in zip(z, probs.tolist(), hard)]
    assert chosen.grad[:, 0].tolist() == pytest.approx(grad, abs=1e-12)  # the hardened labels carry no gradient
    assert metrics["w2s/alpha"].tolist() == [a] * 4
    assert metrics["w2s/hardened_agree_weak"].tolist() == [1.0, 1.0, 0.0, 0.0]  # 0.5 counts as "second"
    # after the warm-up alpha stays at its maximum; at alpha 0 it is soft Bradley-Terry
    late, _ = w2s_confidence(chosen.detach(), rejected, probs, 0.9, alpha=0.75, warmup=0.2)
    assert late.tolist() == pytest.approx(
        [0.25 * ce(zi, pi) + 0.75 * ce(zi, hi) for zi, pi, hi in zip(z, probs.tolist(), hard)]
    )
    # weak labels that mostly say "first": the threshold leaves 3 of the 4 above it
    skewed, m = w2s_confidence(chosen.detach(), rejected, torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=torch.float64), 1.0)
    assert m["w2s/hardened_agree_weak"].tolist() == [1.0, 1.0, 0.0, 1.0]  # z > 0.25 quantile (-0.25): 2, 0, 1
    off, _ = w2s_confidence(chosen.detach(), rejected, probs, 0.9, alpha=0.0)
    assert off.tolist() == pytest.approx(soft_bradley_terry(chosen.detach(), rejected, probs)[0].tolist())


def test_soft_bradley_terry_is_bradley_terry_on_hard_labels():
    chosen, rejected = torch.tensor([[1.5], [-0.5], [0.2]]), torch.tensor([[0.5], [0.5], [0.0]])
    soft, m = soft_bradley_terry(chosen, rejected, torch.tensor([1.0, 0.0, 1.0]))
    hard, _ = bradley_terry(chosen, rejected, torch.tensor([[1], [-1], [1]]), torch.zeros(3))
    assert soft.tolist() == pytest.approx(hard.tolist(), abs=1e-6)
    assert m["accuracy"].tolist() == [1.0, 1.0, 1.0]
    half, m = soft_bradley_terry(chosen, rejected, torch.tensor([0.5, 0.5, 0.5]))
    assert half.tolist() == pytest.approx([ce(z, 0.5) for z in (1.0, -1.0, 0.2)], abs=1e-6)
    assert m["accuracy"].numel() == 0  # pairs at p = 1/2 have no right answer


def test_pgr_and_deception_by_hand():
    # 10 test pairs. weak right on 0-5 (0.6), ceiling right on 0-8 (0.9), student right on 0-3 and 6-9 (0.8)
    weak = np.array([1] * 6 + [0] * 4, dtype=bool)
    ceiling = np.array([1] * 9 + [0], dtype=bool)
    student = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 1], dtype=bool)
    p = W.pgr(weak, student, ceiling, n_boot=500)
    assert p["value"] == pytest.approx((0.8 - 0.6) / (0.9 - 0.6)) and p["n"] == 10
    assert p["lo"] <= p["value"] <= p["hi"]
    d = W.deception(weak, student, ceiling)
    assert d["accuracy_where_weak_right"]["value"] == pytest.approx(4 / 6)  # wrong on 4, 5
    assert d["accuracy_where_weak_wrong"]["value"] == 1.0 and d["accuracy_where_weak_wrong"]["n"] == 4
    assert d["copies_weak_errors"]["value"] == 0.0
    assert d["error_where_strong_knows_weak_right"]["value"] == pytest.approx(2 / 6)
    assert (
        d["error_where_strong_knows_weak_wrong"]["value"] == 0.0 and d["error_where_strong_knows_weak_wrong"]["n"] == 3
    )
    same = W.pgr(weak, student, weak)  # a ceiling no better than the weak model: no PGR
    assert same["value"] is None and same["undefined_resamples"] == 2000


def test_prob_records(tmp_path):
    from alignkit.data.reward import load_reward_examples

    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "prob": 0.2}])
    (e,) = load_reward_examples(str(ok)).examples
    assert e.prob == 0.2 and e.labels == (-1,)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "prob": 1.5}])
    with pytest.raises(RecordError, match="bad.jsonl:1.*prob"):
        load_reward_examples(str(bad))
    both = write_jsonl(
        tmp_path / "both.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "prob": 1, "labels": {}}]
    )
    with pytest.raises(RecordError, match="drop `labels`"):
        load_reward_examples(str(both))


def test_prob_needs_a_loss_that_reads_it(tiny_model_dir, tmp_path):
    from conftest import base_overrides

    import alignkit.api
    from alignkit.config import load_config

    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "hello", "chosen": "good", "rejected": "bad", "prob": 0.7}] * 8
    )
    cfg = load_config(None, [*base_overrides(tiny_model_dir, data, tmp_path / "run", tmp_path / "c"), "recipe=reward"])
    with pytest.raises(ConfigError, match="`prob`.*soft_bradley_terry"):
        alignkit.api.train(cfg, progress=False)


def _task(n=60, seed=0):
    """The better reply says `zeta`, the worse `omega`: words outside the tiny tokenizer's vocabulary,
    so a model reading with it sees the two replies as the same tokens (<unk>), and one reading with
    a tokenizer that has the words can learn the task."""
    import random

    rng = random.Random(seed)
    words = ["the", "cat", "dog", "sky", "is", "blue", "red", "good", "bad"]
    rows = []
    for _ in range(n):
        filler = " ".join(rng.choice(words) for _ in range(3))
        rows.append(
            {"prompt": f"tell me about {filler} ?", "chosen": f"{filler} zeta .", "rejected": f"{filler} omega ."}
        )
    return rows


def test_w2s_protocol_on_tiny_models(tmp_path, capsys):
    from alignkit.cli import main
    from alignkit.testing import save_tiny_model_dir

    weak = save_tiny_model_dir(tmp_path / "weak", seed=1)  # reads zeta and omega as <unk>
    strong = save_tiny_model_dir(tmp_path / "strong", seed=2, extra_words=("zeta", "omega"))
    data = write_jsonl(tmp_path / "pairs.jsonl", _task())
    out = tmp_path / "w2s"
    argv = ["w2s", "--weak", str(weak), "--strong", str(strong), "--data", str(data), "--output-dir", str(out)]
    argv += ["--set", "train.max_steps=12", "--set", "train.batch_size=8", "--set", "train.learning_rate=3e-3"]
    argv += ["--set", "train.report_to=[]", "--set", f"cache_dir={tmp_path / 'cache'}", "--no-progress"]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["pairs"] == {"weak_train": 24, "transfer": 24, "test": 12}
    test = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    # blind by construction: both replies are the same tokens to the weak model, so r(first) - r(second)
    # is 0, read as "the second is better": right exactly where the rejected reply comes first
    assert s["accuracy"]["weak"]["value"] == pytest.approx(sum(r["prob"] == 0.0 for r in test) / 12)
    labels = [json.loads(line)["prob"] for line in (out / "data" / "weak_labels.jsonl").read_text().splitlines()]
    assert labels == [0.5] * 24  # and its labels carry nothing
    assert s["accuracy"]["ceiling"]["value"] >= 0.9  # the strong model sees the words and learns the task
    acc = {k: v["value"] for k, v in s["accuracy"].items()}
    for student in ("student", "student_conf"):
        assert s["pgr"][student]["value"] == pytest.approx(
            (acc[student] - acc["weak"]) / (acc["ceiling"] - acc["weak"])
        )
    assert "PGR" in capsys.readouterr().out
    # a second run finds every stage done: nothing trains again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/final/model.safetensors")}
    assert len(stamps) == 4 and main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/final/model.safetensors")} == stamps


def test_w2s_refuses_settings_it_owns(tmp_path):
    from alignkit.w2s import W2SConfig

    with pytest.raises(ConfigError, match="loss.name"):
        W2SConfig("w", "s", "d", str(tmp_path), overrides=["loss.name=dpo"])
    with pytest.raises(ConfigError, match="--split"):
        W2SConfig("w", "s", "d", str(tmp_path), split=(0.5, 0.5))


def test_w2s_under_torchrun_matches_one_process(tmp_path):
    """The protocol on 2 processes (every training stage FSDP2 on gloo, the same global batch of
    8): the same split, and accuracies within what 2-process float sums allow of the 1-process
    run's (here equal: 12 test pairs whose scores are far from 0)."""
    from conftest import torchrun

    from alignkit.cli import main
    from alignkit.testing import save_tiny_model_dir

    weak = save_tiny_model_dir(tmp_path / "weak", seed=1)
    strong = save_tiny_model_dir(tmp_path / "strong", seed=2, extra_words=("zeta", "omega"))
    data = write_jsonl(tmp_path / "pairs.jsonl", _task())

    def argv(out, batch):
        a = ["w2s", "--weak", str(weak), "--strong", str(strong), "--data", str(data), "--output-dir", str(out)]
        a += ["--set", "train.max_steps=12", "--set", f"train.batch_size={batch}", "--set", "train.learning_rate=3e-3"]
        return a + ["--set", "train.report_to=[]", "--set", f"cache_dir={tmp_path / 'cache'}", "--no-progress"]

    assert main(argv(tmp_path / "one", 8)) == 0
    proc = torchrun([{"argv": [*argv(tmp_path / "two", 4), "--set", "dist.timeout_s=60"]}], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert (tmp_path / "two" / "data" / "test.jsonl").read_text() == (
        tmp_path / "one" / "data" / "test.jsonl"
    ).read_text()
    assert {k: v["value"] for k, v in two["accuracy"].items()} == {k: v["value"] for k, v in one["accuracy"].items()}
    z1, z2 = (np.array(json.loads((tmp_path / d / "scores" / "ceiling_test.json").read_text())) for d in ("one", "two"))
    assert np.abs(z1 - z2).max() < 1e-4  # float32 sums in another order over 2 processes


def test_w2s_on_yes_no_prompts_with_lora(tmp_path, capsys):
    """Yes/no labelled prompts become pairs of the replies "Yes" and "No"; the strong side trains
    LoRA adapters. The weak tokenizer has neither the deciding words nor Yes / No, so the weak model
    scores both replies alike (labels 0.5); the strong one reads them and learns the task."""
    import random

    from alignkit.cli import main
    from alignkit.testing import save_tiny_model_dir

    weak = save_tiny_model_dir(tmp_path / "weak", seed=1)
    strong = save_tiny_model_dir(tmp_path / "strong", seed=2, extra_words=("zeta", "omega", "Yes", "No"))
    rng = random.Random(0)
    rows = []
    for _ in range(120):
        w = rng.choice(["zeta", "omega"])
        rows.append({"prompt": f"tell me about the {rng.choice(['cat', 'dog', 'sky'])} {w} ?", "label": w == "zeta"})
    rows.append({"prompt": "is this labelled ?", "label": "maybe"})
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "w2s"
    argv = ["w2s", "--weak", str(weak), "--strong", str(strong), "--output-dir", str(out), "--no-progress"]
    # The reward is an interaction (the prompt's word decides which reply wins), which a random-init
    # trunk learns only with enough steps: 30 steps at 3e-2 on 24 pairs learned it on one CPU and not
    # on another (float rounding); these settings learned it at each of 10 seeds and at 3e-3 and 1e-2.
    argv += ["--set", "train.max_steps=120", "--set", "train.batch_size=8", "--set", "train.learning_rate=5e-3"]
    argv += ["--set", "train.report_to=[]", "--set", f"cache_dir={tmp_path / 'cache'}"]
    argv += ["--strong-set", "lora.enabled=true", "--strong-set", "lora.r=8"]
    assert main([*argv, "--data", str(bad)]) != 0
    assert re.search(r"bad.jsonl:121: `label` must be true/false", capsys.readouterr().err)
    data = write_jsonl(tmp_path / "yes_no.jsonl", rows[:-1])
    assert main([*argv, "--data", str(data)]) == 0
    s = json.loads((out / "summary.json").read_text())
    first = json.loads((out / "data" / "test.jsonl").read_text().splitlines()[0])
    assert {first["chosen"][0]["content"], first["rejected"][0]["content"]} == {"Yes", "No"}
    labels = [json.loads(line)["prob"] for line in (out / "data" / "weak_labels.jsonl").read_text().splitlines()]
    assert labels == [0.5] * len(labels)
    assert (out / "ceiling" / "final" / "model.safetensors").is_file()  # LoRA merged into the final model
    assert yaml.safe_load((out / "ceiling" / "config.yaml").read_text())["lora"]["enabled"] is True
    assert s["accuracy"]["ceiling"]["value"] == 1.0


def test_confidence_loss_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    """alpha follows the share of training done, which the reward recipe keeps in its checkpoint
    state: a run stopped after step 3 and resumed logs the same alpha and loss at every step as an
    uninterrupted one."""
    from conftest import base_overrides, crash_after

    from alignkit.config import load_config
    from alignkit.train import checkpoint as ckpt
    from alignkit.train import loop
    from alignkit.train.metrics import read_metrics

    rows = [{**r, "prob": p} for r, p in zip(_task(32), [0.9, 0.2, 0.6, 0.4] * 8)]
    data = write_jsonl(tmp_path / "soft.jsonl", rows)

    def cfg(out):
        o = base_overrides(tiny_model_dir, data, tmp_path / out, tmp_path / "c")
        o += ["recipe=reward", "loss.name=w2s_confidence", "loss.warmup=0.5", "data.eval_fraction=0"]
        return load_config(None, o + ["train.max_steps=6", "train.batch_size=8", "train.save_every=3"])

    full = loop.train(cfg("full"), progress=False)
    real = crash_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg("cut"), progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    resumed = loop.train(cfg("cut"), resume=True, progress=False)
    a, b = read_metrics(full.run_dir, "train"), read_metrics(resumed.run_dir, "train")
    # 6 steps, warm-up over half of them: alpha = 0.75 * (step - 1) / 3 up to 0.75
    assert [r["w2s/alpha"] for r in a] == pytest.approx([0.0, 0.25, 0.5, 0.75, 0.75, 0.75])
    assert [r["w2s/alpha"] for r in b] == pytest.approx([r["w2s/alpha"] for r in a])
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-6)
