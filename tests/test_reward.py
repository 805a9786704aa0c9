"""Reward models: the Bradley-Terry loss against its formula, record validation, training on a
tiny model (held-out accuracy, margins, centering, several objectives), freezing, LoRA, and the
saved model loading back in transformers as a sequence classifier with the same scores."""

import math

import pytest
import torch
from conftest import base_overrides, toy_pairs, write_jsonl

from alignkit import losses
from alignkit.config import load_config
from alignkit.data.reward import parse_reward_record
from alignkit.errors import DataError
from alignkit.train import loop
from alignkit.train.metrics import read_metrics


def _bt(chosen, rejected, labels, margins, center_weight=0.0):
    """Independent float64 loop over the formula: mean over judged objectives of
    -log sigmoid(s (r_c - r_r) - m), plus center_weight * mean_k (r_c + r_r)^2."""
    out = []
    for i in range(len(chosen)):
        terms = [
            math.log1p(math.exp(-(s * (c - r) - margins[i])))
            for c, r, s in zip(chosen[i], rejected[i], labels[i])
            if s != 0
        ]
        v = sum(terms) / max(1, len(terms))
        v += center_weight * sum((c + r) ** 2 for c, r in zip(chosen[i], rejected[i])) / len(chosen[i])
        out.append(v)
    return out


@pytest.mark.parametrize("center_weight", [0.0, 0.05])
def test_bradley_terry_matches_formula(center_weight):
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, -1, 0], [1, 1, 1], [0, 0, -1], [-1, 0, 1], [1, 0, 0], [-1, -1, -1]])
    m = torch.rand(6, generator=g, dtype=torch.float64)
    got, metrics = losses.get("bradley_terry").fn(c, r, labels, m, center_weight=center_weight)
    want = _bt(c.tolist(), r.tolist(), labels.tolist(), m.tolist(), center_weight)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-10, rtol=0)
    # Hand-worked: r_c = 1, r_r = 0, label +1, no margin -> log(1 + e^-1) = 0.31326...
    one, _ = losses.get("bradley_terry").fn(torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1))
    assert float(one) == pytest.approx(0.3132617, abs=1e-6)


def test_bradley_terry_gradcheck():
    c = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    labels, m = torch.tensor([[1, -1], [1, 0], [0, -1]]), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    fn = losses.get("bradley_terry").fn
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, labels, m, center_weight=0.1)[0], (c, r))


def test_reward_record_validation():
    ex = parse_reward_record({"prompt": "p", "chosen": "a", "rejected": "b"}, "f:1")
    assert ex.labels == (1,) and ex.margin == 0.0
    ex = parse_reward_record(
        {"prompt": "p", "chosen": "a", "rejected": "b", "labels": {"help": True, "safe": None}},
        "f:2",
        objectives=("help", "safe"),
    )
    assert ex.labels == (1, 0)
    with pytest.raises(DataError, match="f:3: label 'safe' .* must be 1 .*found 2"):
        parse_reward_record(
            {"prompt": "p", "chosen": "a", "rejected": "b", "labels": {"safe": 2}}, "f:3", objectives=("help", "safe")
        )
    with pytest.raises(DataError, match="f:4: .*names \\['fun'\\], which are not in reward.objectives"):
        parse_reward_record(
            {"prompt": "p", "chosen": "a", "rejected": "b", "labels": {"fun": 1}}, "f:4", objectives=("help", "safe")
        )
    with pytest.raises(DataError, match="f:5: field 'margin' must be a finite number >= 0"):
        parse_reward_record({"prompt": "p", "chosen": "a", "rejected": "b", "margin": -1}, "f:5", use_margin=True)
    with pytest.raises(DataError, match="f:6: field 'margin' is missing"):
        parse_reward_record({"prompt": "p", "chosen": "a", "rejected": "b"}, "f:6", use_margin=True)


def _cfg(tiny_model_dir, data, tmp_path, *extra, out="rm"):
    return load_config(
        None,
        base_overrides(tiny_model_dir, data, tmp_path / out, tmp_path / "cache")
        + [
            "recipe=reward",
            "train.learning_rate=2e-3",
            "train.batch_size=8",
            "train.warmup_ratio=0",
            "train.lr_schedule=constant",
            "data.eval_fraction=0.2",
            "train.eval_every=10",
            *extra,
        ],
    )


def test_reward_model_learns_and_reloads_as_sequence_classifier(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, "train.max_steps=20"), progress=False)
    evals = read_metrics(result.run_dir, "eval")
    train = read_metrics(result.run_dir, "train")
    assert evals[-1]["accuracy"] == 1.0 and train[-1]["rewards/margins"] > 2.0
    assert train[-1]["loss"] < 0.2 < train[0]["loss"]
    # transformers loads final/ as a sequence classifier; its score ranks chosen above rejected.
    model = AutoModelForSequenceClassification.from_pretrained(result.final_dir).eval()
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    assert model.config.id2label == {0: "reward"} and model.config.pad_token_id == tok.pad_token_id

    def score(reply):
        text = tok.apply_chat_template(
            [{"role": "user", "content": "what is 2 plus 3 ?"}, {"role": "assistant", "content": reply}], tokenize=False
        )
        with torch.no_grad():
            return float(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0])

    assert score("the answer is 5 .") > score("sorry i cannot help .") + 1.0
    # "The same scores" (README): the classifier's score of a conversation equals the reward that
    # training computes for it, packed [prompt][chosen][rejected] layout and pooling included.
    from alignkit.data.formats import parse_preference_record
    from alignkit.data.tokenize import tokenize_pairs
    from alignkit.heads import sequence_rewards

    full = _cfg(result.final_dir, pairs_file, tmp_path, out="check")
    session = loop.setup(full, progress=False)
    recipe, trained, device = session.recipe, session.model, session.device
    assert full.train.packing  # the layout training used
    pair = parse_preference_record(
        {"prompt": "what is 2 plus 3 ?", "chosen": "the answer is 5 .", "rejected": "sorry i cannot help ."}, "x:1"
    )
    items, _ = tokenize_pairs([pair], recipe.tokenizer, full.data.max_length)
    with torch.no_grad():
        rewards = sequence_rewards(trained.eval(), recipe.collate(items).to(device), recipe.tokenizer.pad_token_id)
    # float32: a packed row and a plain row may be summed in another order by other kernels (equal
    # to the last bit on CPU here), hence 1e-5 rather than exact equality.
    assert rewards[:, 0].tolist() == pytest.approx(
        [score("the answer is 5 ."), score("sorry i cannot help .")], abs=1e-5, rel=0
    )


def test_margin_and_centering(tiny_model_dir, tmp_path):
    rows = [dict(r, margin=3.0) for r in toy_pairs()]
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    runs = {
        name: read_metrics(
            loop.train(
                _cfg(tiny_model_dir, data, tmp_path, "train.max_steps=15", *extra, out=name), progress=False
            ).run_dir,
            "train",
        )
        for name, extra in (
            ("plain", []),
            ("margin", ["reward.use_margin=true"]),
            ("center", ["loss.center_weight=0.1"]),
        )
    }
    # Step 1, rewards near 0 (new head): loss ~ log(1 + e^0) = 0.69 plain, log(1 + e^3) = 3.05 with margin 3.
    assert runs["plain"][0]["loss"] == pytest.approx(math.log(2), abs=0.1)
    assert runs["margin"][0]["loss"] == pytest.approx(math.log1p(math.exp(3)), abs=0.1)
    # The centering term's value and gradient are checked against the formula above; here it must
    # leave training intact.
    assert runs["center"][-1]["rewards/margins"] > 2.0 and runs["center"][-1]["accuracy"] == 1.0


def test_multi_objective_reward_model(tiny_model_dir, tmp_path):
    # "correct": the sum is better; "short": the refusal (shorter) is better, on every pair.
    rows = [dict(r, labels={"correct": 1, "short": -1}) for r in toy_pairs()]
    data = write_jsonl(tmp_path / "mo.jsonl", rows)
    result = loop.train(
        _cfg(tiny_model_dir, data, tmp_path, "train.max_steps=20", "reward.objectives=[correct,short]"), progress=False
    )
    ev = read_metrics(result.run_dir, "eval")[-1]
    assert ev["accuracy/correct"] == 1.0 and ev["accuracy/short"] == 1.0


def test_freeze_layers_and_lora(tiny_model_dir, pairs_file, tmp_path):
    from alignkit.models import load_model, transformer_blocks

    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, "model.freeze_layers=1")
    model = load_model(cfg.model, reward_names=["reward"], pad_token_id=0)
    blocks = transformer_blocks(model)
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert all(p.requires_grad for p in blocks[1].parameters()) and model.score.weight.requires_grad
    assert not model.get_input_embeddings().weight.requires_grad
    result = loop.train(
        _cfg(
            tiny_model_dir,
            pairs_file,
            tmp_path,
            "train.max_steps=12",
            "lora.enabled=true",
            "train.learning_rate=1e-2",
            out="lora",
        ),
        progress=False,
    )
    ev = read_metrics(result.run_dir, "eval")[-1]
    assert ev["accuracy"] == 1.0 and ev["rewards/margins"] > 2.0
    # final/ holds the adapters merged into the weights: reloaded without LoRA, through the full
    # forward path, it gives the eval metrics logged during training (logged to 8 decimals; merged
    # float32 weights round differently from base + adapter, hence 1e-5 on a margin of ~5).
    full = _cfg(result.final_dir, pairs_file, tmp_path, out="lora-check")
    session = loop.setup(full, progress=False)
    recipe, data, model = session.recipe, session.data, session.model
    again = recipe.evaluate(model, data.eval)
    assert again["loss"] == pytest.approx(ev["loss"], abs=1e-6)
    assert again["rewards/margins"] == pytest.approx(ev["rewards/margins"], abs=1e-5)


def test_head_only_reward_model_trains_on_cached_trunk_outputs(tiny_model_dir, pairs_file, tmp_path):
    """freeze_layers = every block: the trunk (final norm included) stays put, the head trains on
    outputs computed once, and the saved classifier's own forward gives the logged eval loss."""
    from transformers import AutoModelForSequenceClassification

    cfg = _cfg(
        tiny_model_dir, pairs_file, tmp_path, "model.freeze_layers=2", "train.max_steps=30", "train.learning_rate=3e-2"
    )
    result = loop.train(cfg, progress=False)
    ev = read_metrics(result.run_dir, "eval")[-1]
    assert ev["accuracy"] == 1.0
    before = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    after = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    for (name, a), b in zip(before.model.named_parameters(), after.model.parameters()):
        assert torch.equal(a, b), name
    full = _cfg(result.final_dir, pairs_file, tmp_path, out="check")  # no freezing: the full forward path
    session = loop.setup(full, progress=False)
    recipe, data, model = session.recipe, session.data, session.model
    assert not recipe.features
    assert recipe.evaluate(model, data.eval)["loss"] == pytest.approx(ev["loss"], abs=1e-5)


def test_head_only_runs_share_the_cached_trunk_outputs(tiny_model_dir, pairs_file, tmp_path, capsys):
    """The frozen trunk's outputs are cached on disk under the initial model and the tokens: a
    second head-only run on the same data (another learning rate, ODIN's two heads) reads them, and
    trains exactly what it trains when it computes them itself (a fresh cache)."""
    from safetensors.torch import load_file

    head_only = ["model.freeze_layers=2", "train.max_steps=6", "reward.disentangle=length"]
    loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, "model.freeze_layers=2", "train.max_steps=6"), progress=False)
    assert "reusing cache" not in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "trunk_outputs").glob("*.safetensors"))) == 2  # train and eval
    cached = loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, *head_only, out="odin"), progress=False)
    assert capsys.readouterr().out.count(": reusing cache") == 2  # train and eval
    fresh_cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, *head_only, f"cache_dir={tmp_path / 'c2'}", out="fresh")
    fresh = loop.train(fresh_cfg, progress=False)
    assert ": reusing cache" not in capsys.readouterr().out and (tmp_path / "c2" / "trunk_outputs").is_dir()
    a, b = load_file(str(cached.final_dir / "model.safetensors")), load_file(str(fresh.final_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reward_model_pads_with_a_token_other_than_end_of_turn():
    from alignkit.heads import use_distinct_pad
    from alignkit.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    assert use_distinct_pad(tok) is None and tok.pad_token == "<|endoftext|>"  # already distinct
    tok.pad_token = tok.eos_token
    note = use_distinct_pad(tok)
    assert tok.pad_token == tok.unk_token and tok.pad_token_id != tok.eos_token_id
    assert "end of each reply" in note
