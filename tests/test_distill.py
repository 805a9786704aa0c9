"""Distillation: the losses (`reverse_kl`, `generalized_jsd`, `adpa`) against hand-worked float64
numbers, GKD's limits and their gradients; `recipe: distill` on tiny models: it lowers the held-out
student-teacher divergence, ADPA raises the teacher's advantage, LoRA works, a teacher with another
tokenizer and config mistakes give clear errors, and a crashed run resumes exactly."""

import json
import math

import pytest
import torch
from conftest import base_overrides, crash_after, toy_pairs, write_jsonl
from safetensors.torch import load_file

from alignkit.cli import main as cli_main
from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.losses import get as get_loss
from alignkit.losses.distill import adpa, generalized_jsd, reverse_kl
from alignkit.testing import tiny_model, tiny_tokenizer
from alignkit.train import checkpoint as ckpt
from alignkit.train import loop
from alignkit.train.metrics import read_metrics
from alignkit.train.recipes.distill import build as build_distill

LN2, LN3 = math.log(2), math.log(3)


def logps(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log()


# Two-token distributions, chosen so that forward and reverse KL differ.
Q = logps([1 / 2, 1 / 2])  # the student
P = logps([1 / 4, 3 / 4])  # the teacher


def test_reverse_kl_hand_worked():
    # KL(Q || P) = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3)
    loss, metrics = reverse_kl(Q, P)
    assert loss.dtype == torch.float64 and metrics == {}
    assert loss.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    assert reverse_kl(P, P)[0].item() == pytest.approx(0.0, abs=1e-15)
    # a token the student gives probability 0 adds nothing (0 log 0 = 0), whatever the teacher says of it
    zero = torch.tensor([[1.0, 0.0]], dtype=torch.float64).log()
    assert reverse_kl(zero, P)[0].item() == pytest.approx(math.log(1 / (1 / 4)), abs=1e-12)


def test_generalized_jsd_hand_worked():
    # beta = 1/2: M = [3/8, 5/8]; JSD = 1/2 KL(P || M) + 1/2 KL(Q || M)
    kl_pm = 1 / 4 * math.log((1 / 4) / (3 / 8)) + 3 / 4 * math.log((3 / 4) / (5 / 8))
    kl_qm = 1 / 2 * math.log((1 / 2) / (3 / 8)) + 1 / 2 * math.log((1 / 2) / (5 / 8))
    assert generalized_jsd(Q, P, beta=0.5)[0].item() == pytest.approx(0.5 * kl_pm + 0.5 * kl_qm, abs=1e-12)
    # beta = 1/4 weighs the teacher by 1/4 in M = [7/16, 9/16]: GKD's M = beta P + (1 - beta) Q
    kl_pm = 1 / 4 * math.log(4 / 7) + 3 / 4 * math.log(4 / 3)
    kl_qm = 1 / 2 * math.log(8 / 7) + 1 / 2 * math.log(8 / 9)
    assert generalized_jsd(Q, P, beta=0.25)[0].item() == pytest.approx(0.25 * kl_pm + 0.75 * kl_qm, abs=1e-12)
    # not symmetric in (student, teacher) for beta != 1/2, bounded by the entropy of (beta, 1 - beta)
    assert generalized_jsd(P, Q, beta=0.25)[0].item() != pytest.approx(generalized_jsd(Q, P, beta=0.25)[0].item())
    wide = torch.randn(64, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 6
    jsd = generalized_jsd(wide[:32].log_softmax(-1), wide[32:].log_softmax(-1), beta=0.3)[0]
    assert (jsd >= 0).all() and (jsd <= -(0.3 * math.log(0.3) + 0.7 * math.log(0.7)) + 1e-12).all()
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(Q, P, beta=1.5)


def test_jsd_ends_are_the_kl_forms_gkd_states():
    forward = 3 / 4 * LN3 - LN2  # KL(P || Q) = 1/4 ln(1/2) + 3/4 ln(3/2)
    reverse = 0.5 * math.log(4 / 3)  # KL(Q || P)
    assert generalized_jsd(Q, P, beta=0.0)[0].item() == pytest.approx(forward, abs=1e-12)
    assert generalized_jsd(Q, P, beta=1.0)[0].item() == pytest.approx(reverse, abs=1e-12)
    assert generalized_jsd(Q, P, beta=1.0)[0].item() == pytest.approx(reverse_kl(Q, P)[0].item(), abs=1e-15)
    # ... and they are the limits of the JSD itself, renormalised: JSD/beta -> KL(P || Q) as beta -> 0,
    # JSD/(1 - beta) -> KL(Q || P) as beta -> 1. The error is first order in the distance to the end
    # (JSD = beta KL(P || Q) + O(beta^2)), so at 1e-6 from the end agreement is to ~1e-6 relative.
    eps = 1e-6
    assert generalized_jsd(Q, P, beta=eps)[0].item() / eps == pytest.approx(forward, rel=1e-5)
    assert generalized_jsd(Q, P, beta=1 - eps)[0].item() / eps == pytest.approx(reverse, rel=1e-5)


def test_adpa_hand_worked():
    student = logps([1 / 2, 1 / 4, 1 / 4])
    teacher = logps([1 / 2, 1 / 4, 1 / 4])
    reference = logps([1 / 4, 1 / 2, 1 / 4])
    # A = log pi_T - log pi_ref = [ln 2, -ln 2, 0]; E_q[A] = 1/2 ln 2 - 1/4 ln 2 = 1/4 ln 2
    loss, metrics = adpa(student, teacher, reference)
    assert loss.item() == pytest.approx(-0.25 * LN2, abs=1e-12)
    assert metrics["advantage"].item() == pytest.approx(0.25 * LN2, abs=1e-12)
    # a teacher that preference training did not move gives no signal
    assert adpa(student, reference, reference)[0].item() == pytest.approx(0.0, abs=1e-15)


def test_gradients_match_the_hand_derived_forms():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)  # student logits
    t = torch.randn(4, 6, dtype=torch.float64, generator=gen).log_softmax(-1)
    r = torch.randn(4, 6, dtype=torch.float64, generator=gen).log_softmax(-1)
    q = z.detach().softmax(-1)
    lq = q.log()
    # reverse KL: d KL / d z_j = q_j (log q_j - log p_j - KL)
    kl = (q * (lq - t)).sum(-1, keepdim=True)
    (grad,) = torch.autograd.grad(reverse_kl(z.log_softmax(-1), t)[0].sum(), z)
    torch.testing.assert_close(grad, q * (lq - t - kl), atol=1e-12, rtol=0)
    # ADPA: d(-E_q[A]) / d z_j = -q_j (A_j - E_q[A])
    a = t - r
    (grad,) = torch.autograd.grad(adpa(z.log_softmax(-1), t, r)[0].sum(), z)
    torch.testing.assert_close(grad, -q * (a - (q * a).sum(-1, keepdim=True)), atol=1e-12, rtol=0)
    # every loss against finite differences
    for fn in (
        lambda s: reverse_kl(s, t)[0],
        lambda s: generalized_jsd(s, t, beta=0.3)[0],
        lambda s: generalized_jsd(s, t, beta=0.0)[0],
        lambda s: adpa(s, t, r)[0],
    ):
        assert torch.autograd.gradcheck(lambda x, fn=fn: fn(x.log_softmax(-1)), (z,))


def test_losses_are_registered_and_listed(capsys):
    for name in ("reverse_kl", "generalized_jsd", "adpa"):
        spec = get_loss(name)
        assert spec.data == "distill" and spec.reduction == "token" and not spec.needs_reference
    assert get_loss("adpa").inputs == ("student_logps", "teacher_logps", "teacher_ref_logps")
    assert get_loss("generalized_jsd").params == {"beta": 0.5}
    cli_main(["losses"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("reverse_kl", "generalized_jsd", "adpa"))


# ---------------------------------------------------------------------------------------------
# The recipe on tiny models


def _save(path, model, tok):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _sharp(seed: int, scale: float = 30.0):
    """A tiny model with a confident head: a random-init head gives near-uniform distributions."""
    model = tiny_model(vocab_size=len(tiny_tokenizer()), seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    tok = tiny_tokenizer()
    out = {"teacher": _save(root / "teacher", _sharp(1), tok), "reference": _save(root / "reference", _sharp(2), tok)}
    # another tokenizer: one more word
    bigger = tiny_tokenizer()
    bigger.add_tokens(["zebra"])
    out["other_vocab"] = _save(root / "other_vocab", tiny_model(vocab_size=len(bigger), seed=3), bigger)
    # the same words, two of them with swapped ids
    swapped = _save(root / "swapped", tiny_model(vocab_size=len(tok), seed=3), tok)
    spec = json.loads((swapped / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["answer"], vocab["is"] = vocab["is"], vocab["answer"]
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    out["swapped"] = swapped
    out["prompts"] = write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in toy_pairs(48)])
    return out


def _args(student, models, tmp_path, *extra, out="run"):
    return base_overrides(student, models["prompts"], tmp_path / out, tmp_path / "cache") + [
        "recipe=distill",
        f"teacher.name_or_path={models['teacher']}",
        "generation.num_samples=4",
        "generation.max_new_tokens=8",
        "train.batch_size=4",
        "train.warmup_ratio=0",
        "train.learning_rate=1e-2",
        "train.lr_schedule=constant",
        "data.eval_fraction=0.25",
        "train.max_steps=6",
        *extra,
    ]


def test_distillation_lowers_the_heldout_divergence_to_the_teacher(tiny_model_dir, models, tmp_path):
    cfg = load_config(None, _args(tiny_model_dir, models, tmp_path, "train.max_steps=30"))
    result = loop.train(cfg, progress=False)
    evals = read_metrics(result.run_dir, "eval")
    assert [e["step"] for e in evals] == [0, 30]
    assert evals[-1]["teacher_kl"] < 0.5 * evals[0]["teacher_kl"], evals
    assert evals[-1]["loss"] < 0.5 * evals[0]["loss"]
    assert evals[0]["loss"] == pytest.approx(evals[0]["teacher_kl"], rel=0.2)  # reverse KL, per sequence then mean
    rows = read_metrics(result.run_dir, "train")
    for key in ("loss", "teacher_kl", "entropy", "completion_length", "logprob_mismatch", "time/generation_s"):
        assert key in rows[-1], key
    assert not any(k.startswith("reward") for r in rows + evals for k in r)  # no online.rewards: no reward metrics
    assert max(r["logprob_mismatch_max"] for r in rows) < 1e-4  # the loss reads the distribution that sampled


def test_truncated_sampling_is_what_the_mismatch_compares(tiny_model_dir, models, tmp_path):
    """Temperature 0.7, top-p 0.9, top-k 20 (issue 28): the sampler records the log-probs of the
    distribution it drew from, and so does the student's `sampled_logps` the mismatch reads."""
    extra = ("generation.temperature=0.7", "generation.top_p=0.9", "generation.top_k=20", "train.max_steps=2")
    cfg = load_config(None, _args(tiny_model_dir, models, tmp_path, *extra))
    rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
    assert max(r["logprob_mismatch_max"] for r in rows) < 1e-4


def test_jsd_with_lora_and_a_logged_reward(tiny_model_dir, models, tmp_path):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(
        "def words(prompts, completions, **columns):\n    return [len(c.split()) for c in completions]\n"
    )
    cfg = load_config(
        None,
        _args(
            tiny_model_dir,
            models,
            tmp_path,
            "loss.name=generalized_jsd",
            "loss.beta=0.9",
            "lora.enabled=true",
            "lora.r=4",
            "train.max_steps=3",
            f"online.rewards={rewards}:words",
        ),
    )
    result = loop.train(cfg, progress=False)
    rows, evals = read_metrics(result.run_dir, "train"), read_metrics(result.run_dir, "eval")
    assert all("reward" in r for r in rows + evals) and rows[0]["reward"] > 0
    assert all(math.isfinite(r["loss"]) and 0 < r["loss"] < math.log(2) for r in rows)  # JSD(beta) <= ln 2
    # the adapters trained, and were merged into the exported student
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(result.final_dir / "model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_adpa_raises_the_teachers_advantage(tiny_model_dir, models, tmp_path):
    cfg = load_config(
        None,
        _args(
            tiny_model_dir,
            models,
            tmp_path,
            f"teacher.reference={models['reference']}",
            "losses=[{name: adpa}, {name: reverse_kl, weight: 0.05}]",
            "train.learning_rate=3e-2",
            "train.max_steps=10",
        ),
    )
    result = loop.train(cfg, progress=False)
    evals, rows = read_metrics(result.run_dir, "eval"), read_metrics(result.run_dir, "train")
    assert evals[-1]["advantage"] > evals[0]["advantage"] + 1.0, evals
    assert {"loss/adpa", "loss/reverse_kl", "advantage"} <= set(rows[-1])


@pytest.mark.parametrize(
    "which,why", [("other_vocab", "123 and 122 tokens|122 and 123 tokens"), ("swapped", "probe string")]
)
def test_a_teacher_with_another_tokenizer_is_a_clear_error(tiny_model_dir, models, tmp_path, which, why):
    args = _args(tiny_model_dir, models, tmp_path) + [f"teacher.name_or_path={models[which]}"]
    with pytest.raises(ConfigError, match="do not share a tokenizer") as err:
        loop.train(load_config(None, args), progress=False)
    message = str(err.value)
    assert str(models[which]) in message and str(tiny_model_dir) in message
    assert any(w in message for w in why.split("|")), message


def test_config_errors(tiny_model_dir, models, tmp_path):
    base = _args(tiny_model_dir, models, tmp_path)
    tok = tiny_tokenizer()
    no_teacher = load_config(None, [a for a in base if not a.startswith("teacher.")])
    with pytest.raises(ConfigError, match="set `teacher.name_or_path`"):  # before any model loads
        build_distill(no_teacher, tok)
    with pytest.raises(ConfigError, match="Did you mean `teacher.name_or_path`"):
        load_config(None, base + ["teacher.name_or_pth=x"])
    with pytest.raises(ConfigError, match="recipe grpo does not read `teacher.name_or_path`"):
        load_config(None, base + ["recipe=grpo", "online.rewards=numeric_match"])
    cfg = load_config(None, base)  # no online.rewards: distillation needs none
    assert cfg.online.rewards is None and cfg.loss == {"name": "reverse_kl"}
    with pytest.raises(ConfigError, match="set `teacher.reference`"):
        build_distill(load_config(None, base + ["loss.name=adpa"]), tok)
    with pytest.raises(ConfigError, match="does not read it"):
        build_distill(load_config(None, base + [f"teacher.reference={models['reference']}"]), tok)
    with pytest.raises(ConfigError, match="needs paired data"):
        build_distill(load_config(None, base + ["loss.name=dpo"]), tok)
    with pytest.raises(ConfigError, match="loss.bta"):
        build_distill(load_config(None, base + ["loss.name=generalized_jsd", "loss.bta=0.1"]), tok)


def test_resume_after_a_crash_equals_the_uninterrupted_run(tiny_model_dir, models, tmp_path, monkeypatch):
    """Crashed after the checkpoint of step 3: the middle of a rollout's two updates (`online.iterations`
    2), so the rollout in progress comes back from the checkpoint; the teacher is simply reloaded."""
    steps = ["train.max_steps=6", "train.save_every=3", "online.iterations=2"]
    full = loop.train(load_config(None, _args(tiny_model_dir, models, tmp_path, *steps, out="full")), progress=False)
    real_save = crash_after(monkeypatch, 3)
    cfg = load_config(None, _args(tiny_model_dir, models, tmp_path, *steps, out="crashed"))
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    resumed = loop.train(cfg, resume=True, progress=False)
    a, b = read_metrics(full.run_dir), read_metrics(resumed.run_dir)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
    pa, pb = (load_file(str(r.final_dir / "model.safetensors")) for r in (full, resumed))
    assert max(float((pa[k] - pb[k]).abs().max()) for k in pa) < 1e-6
