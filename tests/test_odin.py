"""ODIN (`reward.disentangle: length`, arXiv 2402.07319): a quality and a length head whose sum
fits the preferences, the quality head uncorrelated with length and the only reward at use time."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import base_overrides

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.losses.reward import odin_terms, pearson
from alignkit.rewards.model import RewardModel
from alignkit.train import loop
from alignkit.train.metrics import read_metrics


def test_odin_terms_match_a_float64_formula():
    q = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, -0.5], dtype=torch.float64)
    ln = torch.tensor([0.8, 0.1, 1.2, -0.3, 0.0, 0.4], dtype=torch.float64)
    lengths = torch.tensor([12.0, 30.0, 7.0, 55.0, 41.0, 20.0], dtype=torch.float64)
    wq = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    wl = torch.tensor([0.5, -0.5, 2.0], dtype=torch.float64)
    term, metrics = odin_terms(q, ln, lengths, wq, wl, length_coef=0.7, orthogonal_coef=0.3)
    rho_q = np.corrcoef(q.numpy(), lengths.numpy())[0, 1]
    rho_l = np.corrcoef(ln.numpy(), lengths.numpy())[0, 1]
    ortho = abs(1.0 * 0.5 + 2.0 * -0.5 + -1.0 * 2.0)  # |w_q . w_l| = |0.5 - 1 - 2| = 2.5
    assert float(term) == pytest.approx(0.7 * (abs(rho_q) - rho_l) + 0.3 * ortho, abs=1e-9)  # the paper's
    other, _ = odin_terms(q, ln, lengths, wq, wl, length_coef=0.7, orthogonal_coef=0.3, length_sign=-1.0)
    assert float(other) == pytest.approx(0.7 * (abs(rho_q) + rho_l) + 0.3 * ortho, abs=1e-9)
    squared, _ = odin_terms(q, ln, lengths, wq, wl, length_coef=0.7, orthogonal_coef=0.3, squared=True)
    assert float(squared) == pytest.approx(0.7 * (rho_q**2 - rho_l) + 0.3 * ortho, abs=1e-9)
    assert abs(rho_q) > 0.1  # so the two differ
    assert float(metrics["odin/quality_length_corr"]) == pytest.approx(rho_q, abs=1e-9)
    assert float(metrics["odin/orthogonality"]) == pytest.approx(2.5)
    assert float(pearson(torch.ones(4), torch.arange(4.0))) == 0.0  # a constant has no correlation


def _synthetic(n: int, seed: int, length_weight: float = 2.0):
    """Pairs of responses with features [length, quality, noise, noise]; the preference is a known
    mix of the two (equal weights; a negative `length_weight` prefers the shorter reply), so a
    plain reward model learns length as much as quality."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 2, 4, generator=g)
    lengths = 40 + 15 * feats[..., 0]
    logit = 2.0 * (feats[:, 0, 1] - feats[:, 1, 1]) + length_weight * (feats[:, 0, 0] - feats[:, 1, 0])
    first_wins = torch.rand(n, generator=g) < torch.sigmoid(logit)
    chosen = torch.where(first_wins[:, None], feats[:, 0], feats[:, 1])
    rejected = torch.where(first_wins[:, None], feats[:, 1], feats[:, 0])
    lc = torch.where(first_wins, lengths[:, 0], lengths[:, 1])
    lr = torch.where(first_wins, lengths[:, 1], lengths[:, 0])
    return chosen, rejected, lc, lr


def _fit(odin: bool, steps: int = 400, length_weight: float = 2.0, length_sign: float = 1.0):
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 2 if odin else 1, bias=False)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    chosen, rejected, lc, lr = _synthetic(512, seed=1, length_weight=length_weight)
    for _ in range(steps):
        rc, rr = head(chosen), head(rejected)
        loss = -F.logsigmoid(rc.sum(-1) - rr.sum(-1)).mean()
        if odin:
            heads = torch.cat([rc, rr])
            term, _ = odin_terms(
                heads[:, 0], heads[:, 1], torch.cat([lc, lr]), head.weight[0], head.weight[1], length_sign=length_sign
            )
            loss = loss + term
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def test_the_quality_head_recovers_the_hidden_quality_and_ignores_length():
    chosen, rejected, lc, lr = _synthetic(1024, seed=2)  # held-out pairs
    feats, lengths = torch.cat([chosen, rejected]), torch.cat([lc, lr])
    plain_head, odin_head = _fit(odin=False), _fit(odin=True)
    with torch.no_grad():
        plain, heads = plain_head(feats)[:, 0], odin_head(feats)
    quality, length_head = heads[:, 0], heads[:, 1]
    assert float(pearson(plain, lengths)) > 0.5  # the plain model pays for length
    assert abs(float(pearson(quality, lengths))) < 0.05  # the quality head does not
    assert float(pearson(quality, feats[:, 1])) > 0.95  # it reads the hidden quality feature
    assert float(pearson(length_head, lengths)) > 0.95  # and the length head took length


def _heldout_accuracy(head, length_weight: float) -> float:
    chosen, rejected, _, _ = _synthetic(1024, seed=2, length_weight=length_weight)
    with torch.no_grad():
        return float((head(chosen).sum(-1) > head(rejected).sum(-1)).float().mean())


def test_when_shorter_replies_win_the_length_head_takes_the_negative_sign():
    """Preferences that favour the shorter reply (as HH-RLHF harmless does): with the sign -1 (what
    `length_sign: auto` picks on such data) the length head takes length negatively and the quality
    head still reads quality alone; the paper's +1 forces the length head the wrong way, and the
    summed reward, which then cannot carry the preference for brevity, fits held-out pairs worse."""
    chosen, rejected, lc, lr = _synthetic(1024, seed=2, length_weight=-2.0)
    feats, lengths = torch.cat([chosen, rejected]), torch.cat([lc, lr])
    negative, positive = _fit(True, length_weight=-2.0, length_sign=-1.0), _fit(True, length_weight=-2.0)
    with torch.no_grad():
        heads = negative(feats)
        assert float(pearson(positive(feats)[:, 1], lengths)) > 0.95  # made to pay for length
    assert float(pearson(heads[:, 1], lengths)) < -0.95
    assert abs(float(pearson(heads[:, 0], lengths))) < 0.05 and float(pearson(heads[:, 0], feats[:, 1])) > 0.95
    plain = _heldout_accuracy(_fit(False, length_weight=-2.0), -2.0)
    assert _heldout_accuracy(negative, -2.0) > plain - 0.02
    assert _heldout_accuracy(positive, -2.0) < plain - 0.1


@pytest.fixture
def pairs(tmp_path):
    from conftest import toy_pairs, write_jsonl

    rows = toy_pairs(32)
    for i, r in enumerate(rows):  # chosen is the longer reply half of the time
        if i % 2:
            r["chosen"], r["rejected"] = "the answer is " + r["chosen"].split()[-2] + " .", r["rejected"] + " sorry ."
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.mark.parametrize("mode", [["model.freeze_layers=2"], ["lora.enabled=true", "lora.r=4"]])
def test_a_disentangled_reward_model_trains_and_rewards_with_its_quality_head(tiny_model_dir, pairs, tmp_path, mode):
    cfg = load_config(
        None,
        base_overrides(tiny_model_dir, pairs, tmp_path / "run", tmp_path / "cache")
        + [
            "recipe=reward",
            "reward.disentangle=length",
            "train.max_steps=6",
            "train.batch_size=8",
            "train.learning_rate=2e-2",
            "data.eval_fraction=0.25",
            *mode,
        ],
    )
    result = loop.train(cfg, progress=False)
    rows = read_metrics(result.run_dir, "train")
    for key in ("odin/quality_length_corr", "odin/length_head_corr", "odin/orthogonality", "accuracy/quality"):
        assert key in rows[-1], key
    rm = RewardModel(result.final_dir, device="cpu")
    assert rm.names == ["quality", "length"]
    prompts, replies = ["what is 1 plus 2 ?"] * 2, ["the answer is 3 .", "sorry i cannot help ."]
    both = rm.score_all(prompts, replies)  # [2, 2]: quality, length
    assert rm(prompts, replies) == pytest.approx(both[:, 0].tolist())  # the quality head alone
    full = RewardModel(result.final_dir, device="cpu", weights={"quality": 1.0, "length": 1.0})
    assert full(prompts, replies) == pytest.approx(both.sum(1).tolist(), abs=1e-5)


def test_disentangle_settings_that_cannot_work(tiny_model_dir, pairs, tmp_path):
    base = base_overrides(tiny_model_dir, pairs, tmp_path / "r", tmp_path / "c") + ["recipe=reward"]
    with pytest.raises(ConfigError, match="several reward.objectives"):
        load_config(None, base + ["reward.disentangle=length", "reward.objectives=[helpful, harmless]"])
    for key in ("reward.length_coef=2.0", "reward.length_sign=positive", "reward.correlation_penalty=squared"):
        with pytest.raises(ConfigError, match="no effect without `reward.disentangle: length`"):
            load_config(None, base + [key])
    with pytest.raises(ConfigError, match="recipe dpo does not read"):
        load_config(None, base + ["recipe=dpo", "reward.disentangle=length"])
    with pytest.raises(ConfigError, match="forward_tokens.*cut it into pieces"):
        load_config(None, base + ["reward.disentangle=length", "train.forward_tokens=64"])


def test_small_odin_batches_get_a_note(tiny_model_dir, pairs, tmp_path, capsys):
    from alignkit.train.session import setup

    base = base_overrides(tiny_model_dir, pairs, tmp_path / "r", tmp_path / "c") + ["recipe=reward"]

    def correlation_notes(*extra):
        capsys.readouterr()
        setup(load_config(None, base + list(extra)), progress=False)
        return [line for line in capsys.readouterr().out.splitlines() if "correlation" in line]

    (note,) = correlation_notes("reward.disentangle=length", "train.batch_size=8")
    assert "16 replies" in note and "0.26" in note and "train.batch_size x processes to 32 pairs" in note
    assert not correlation_notes("reward.disentangle=length", "train.batch_size=32")
    assert not correlation_notes("train.batch_size=8")


def test_the_length_sign_follows_the_training_pairs(tiny_model_dir, tmp_path, capsys):
    from conftest import toy_pairs, write_jsonl

    from alignkit.train.session import setup

    rows = toy_pairs(16)
    for r in rows:
        r["chosen"], r["rejected"] = r["chosen"] + " sorry .", r["rejected"]  # the preferred reply is longer
    longer = write_jsonl(tmp_path / "longer.jsonl", rows)
    shorter = write_jsonl(
        tmp_path / "shorter.jsonl", [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    )

    def sign(data, *extra):
        base = base_overrides(tiny_model_dir, data, tmp_path / "r", tmp_path / "c")
        cfg = load_config(None, base + ["recipe=reward", "reward.disentangle=length", "train.batch_size=32", *extra])
        capsys.readouterr()
        recipe = setup(cfg, progress=False).recipe
        (note,) = [line for line in capsys.readouterr().out.splitlines() if "length head is pushed" in line]
        return recipe.length_sign, note

    s, note = sign(longer)
    assert s == 1.0 and "correlate with length" in note and "longer in 15 of the 15" in note  # 1 held out
    s, note = sign(shorter)
    assert s == -1.0 and "against length" in note and "longer in 0 of the 15" in note
    assert sign(shorter, "reward.length_sign=positive")[0] == 1.0  # the paper's sign, when asked for


def test_head_only_odin_takes_its_correlations_over_every_training_reply(tiny_model_dir, pairs, tmp_path, capsys):
    """With every block frozen the trunk outputs are cached, so ODIN's correlations are the exact
    ones over the whole training split, not a micro-batch's noisy estimate."""
    from alignkit.heads import reward_trunk_and_head
    from alignkit.train.session import setup

    base = base_overrides(tiny_model_dir, pairs, tmp_path / "r", tmp_path / "c")
    cfg = load_config(None, base + ["recipe=reward", "reward.disentangle=length", "model.freeze_layers=2"])
    capsys.readouterr()
    s = setup(cfg, progress=False)
    (note,) = [line for line in capsys.readouterr().out.splitlines() if "correlation" in line]
    n = len(s.data.train)
    assert f"over all {2 * n} training replies" in note and "micro-batch's 16" not in note
    assert "penalised squared (reward.correlation_penalty=auto)" in note and s.recipe.squared
    recipe, head = s.recipe, reward_trunk_and_head(s.model)[1]
    torch.nn.init.normal_(head.weight)  # a head whose rewards vary with the features
    batch = recipe.collate(s.data.train[:4])
    _, metrics = recipe.loss(s.model, batch, "train")
    ids = torch.tensor([it.index for it in s.data.train])
    with torch.no_grad():
        every = head(torch.cat([recipe.features["train"][ids, 0], recipe.features["train"][ids, 1]]))[:, 0]
        few = head(torch.cat([recipe.features["train"][ids[:4], 0], recipe.features["train"][ids[:4], 1]]))[:, 0]
    lengths = torch.cat([recipe.lengths["train"][ids, 0], recipe.lengths["train"][ids, 1]])
    expected = float(pearson(every, lengths))
    assert float(metrics["odin/quality_length_corr"]) == pytest.approx(expected, abs=1e-5)
    assert abs(float(pearson(few, lengths[[0, 1, 2, 3, n, n + 1, n + 2, n + 3]])) - expected) > 1e-3


def test_odin_correlates_with_the_replies_whole_lengths(tiny_model_dir, tmp_path):
    """Replies longer than data.max_length leaves room for are cut, but ODIN's lengths are the
    whole replies' (what the reward model reads when it is used, and what `alignkit eval` measures
    its bias against): cut ones would put every long reply at the same length."""
    from conftest import write_jsonl

    from alignkit.data.reward import load_reward_examples
    from alignkit.data.splits import load_examples
    from alignkit.data.tokenize import tokenize_pairs
    from alignkit.train.session import setup

    rows = [
        {"prompt": "what is 2 plus 2 ?", "chosen": " ".join(["the"] * c), "rejected": " ".join(["sorry"] * r)}
        for c, r in [(3, 30), (40, 2), (25, 60), (5, 9), (50, 1), (2, 4)]
    ]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    base = base_overrides(tiny_model_dir, data, tmp_path / "r", tmp_path / "c")
    extra = ["recipe=reward", "reward.disentangle=length", "data.max_length=24", "data.eval_fraction=0"]
    cfg = load_config(None, base + extra)
    s = setup(cfg, progress=False)
    assert max(len(it.chosen_ids) for it in s.data.train) < 24 and any(it.truncated for it in s.data.train)
    examples = load_examples(cfg.data, cfg.seed, load_reward_examples)[0]  # the recipe's order
    whole, _ = tokenize_pairs([e.pair for e in examples], s.recipe.tokenizer, 10**6)
    lengths = s.recipe.lengths["train"]
    for it in s.data.train:
        ref = whole[it.index]
        assert lengths[it.index].tolist() == [len(ref.chosen_ids), len(ref.rejected_ids)]
    assert lengths.max() > 50  # the 60-word reply, at its length


@pytest.mark.parametrize(
    "extra, squared",
    [
        (["model.freeze_layers=2"], True),  # head only: exact correlations, squared under auto
        (["model.freeze_layers=2", "reward.correlation_penalty=absolute"], False),
        ([], False),  # every weight trains: micro-batch estimates, the paper's |rho| under auto
        (["reward.correlation_penalty=squared"], True),
    ],
)
def test_the_correlation_penalty_follows_where_the_correlations_come_from(
    tiny_model_dir, pairs, tmp_path, extra, squared
):
    from alignkit.train.session import setup

    base = base_overrides(tiny_model_dir, pairs, tmp_path / "r", tmp_path / "c")
    s = setup(load_config(None, base + ["recipe=reward", "reward.disentangle=length", *extra]), progress=False)
    assert s.recipe.squared is squared
    batch = s.recipe.collate(s.data.train[:4])
    with torch.no_grad():
        loss, metrics = s.recipe.loss(s.model, batch, "train")
        s.recipe.squared = not squared
        other, _ = s.recipe.loss(s.model, batch, "train")
    rho = float(metrics["odin/quality_length_corr"])
    assert 0.01 < abs(rho) < 0.99
    # the loss counts the term once per example of the batch: the two penalties differ by b (rho^2 - |rho|)
    diff = batch.num_examples * (rho**2 - abs(rho)) * (1 if squared else -1)
    assert float(loss - other) == pytest.approx(diff, rel=1e-4)
