"""Deita-style selection (alignkit.datatools.select): the greedy walk on hand-made 2-D embeddings,
the expected complexity rating, embeddings from a tiny model, and the score plot."""

import math

import pytest
import torch

from alignkit.datatools.select import (
    RATINGS,
    complexity_score,
    embed,
    evol_score,
    expected_rating,
    plot_scores,
    quality_score,
    select,
)
from alignkit.errors import AlignkitError, ConfigError


def unit(deg: float) -> list:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# Six examples on the unit circle. min_distance 0.1 keeps an example only when its nearest kept one
# is more than arccos(0.9) = 25.84 degrees away.
SCORES = [0.9, 0.5, 0.8, 0.7, 0.5, 0.2]
ANGLES = [0, 90, 10, 60, 180, 45]


def test_select_walks_down_the_scores_and_skips_near_duplicates():
    emb = torch.tensor([unit(a) for a in ANGLES], dtype=torch.float64)
    # order by score, ties by index: 0 (0.9), 2 (0.8), 3 (0.7), 1 (0.5), 4 (0.5), 5 (0.2)
    # 0 kept; 2 is 10 deg from 0 (distance 1 - cos 10 = 0.015): redundant; 3 is 60 deg from 0: kept;
    # 1 is 30 deg from 3 (distance 0.134 > 0.1): kept -> budget 3 reached; 4 and 5 never looked at.
    # (Had 4 come before its tie 1, it would have been kept third.)
    idx, counts = select(SCORES, emb, 3, min_distance=0.1)
    assert idx == [0, 3, 1]
    assert counts == {"selected": 3, "redundant": 1, "not_reached": 2}
    # a larger budget: 4 is 90 deg from 1 (kept); 5 is 15 deg from 3 (distance 0.034): redundant
    idx, counts = select(SCORES, emb, 10, min_distance=0.1)
    assert idx == [0, 3, 1, 4]
    assert counts == {"selected": 4, "redundant": 2, "not_reached": 0}
    # min_distance 0.6 (more than 66.4 deg apart): 3 (60 deg from 0, distance 0.5) and 5 (45 deg from 0 and 1,
    # distance 0.29) are redundant as well; 1 (90 deg from 0) and 4 (90 deg from 1) are kept
    idx, counts = select(SCORES, emb, 10, min_distance=0.6)
    assert idx == [0, 1, 4]
    assert counts == {"selected": 3, "redundant": 3, "not_reached": 0}


def test_select_scales_embeddings_and_keeps_only_strictly_farther():
    raw = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # unit after scaling: 90 deg apart, distance exactly 1
    assert select([2.0, 1.0], raw, 5, min_distance=0.999)[0] == [0, 1]
    assert select([2.0, 1.0], raw, 5, min_distance=1.0) == ([0], {"selected": 1, "redundant": 1, "not_reached": 0})
    assert select([1.0, 1.0], [[1, 0], [0, 1]], 1)[0] == [0]  # integer lists work; the tie goes to index 0
    assert select([1.0], [[1.0, 0.0]], 0) == ([], {"selected": 0, "redundant": 0, "not_reached": 1})


@pytest.mark.parametrize(
    "args, match",
    [
        (([1.0, 2.0], [[1.0, 0.0]], 1), "one row per score"),
        (([1.0, math.nan], [[1.0, 0.0], [0.0, 1.0]], 1), "not finite"),
        (([1.0, 2.0], [[1.0, 0.0], [0.0, 0.0]], 1), "all-zero"),
        (([1.0], [[1.0, 0.0]], -1), "budget"),
    ],
)
def test_select_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        select(*args)


class FixedJudge:
    """option_logprobs returns the given rows; records what it was asked."""

    name = "fixed"

    def __init__(self, rows):
        self.rows, self.asked = rows, []

    def option_logprobs(self, conversations, options):
        self.asked.append((conversations, options))
        return self.rows[: len(conversations)]


def test_complexity_is_the_expected_rating():
    lg = math.log
    rows = [
        [lg(1), lg(2), lg(3), lg(4), -math.inf, -math.inf],  # p = .1 .2 .3 .4 0 0 -> .1+.4+.9+1.6 = 3.0
        [-7.0] * 6,  # uniform -> 3.5
        [lg(3) - 5, -math.inf, -math.inf, -math.inf, -math.inf, lg(1) - 5],  # p(1)=3/4, p(6)=1/4 -> 2.25
    ]
    lm = FixedJudge(rows)
    got = complexity_score(
        lm, ["write a poem", [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], "explain"]
    )
    assert got == pytest.approx([3.0, 3.5, 2.25], abs=1e-12)
    convs, options = lm.asked[0]
    assert options == list(RATINGS) == ["1", "2", "3", "4", "5", "6"]
    assert "\nwrite a poem\n" in convs[0][0]["content"] and "\nhi\n" in convs[1][0]["content"]  # last user turn
    assert complexity_score(lm, []) == []
    with pytest.raises(AlignkitError, match="prompt 4"):
        expected_rating([-math.inf] * 6, 4)
    with pytest.raises(ConfigError, match=r"\{instruction\}"):
        complexity_score(lm, ["x"], template="Rate this.")


def test_quality_and_evol_scores():
    def reward(prompts, completions, **columns):
        return [len(c) + columns["bonus"][i] for i, c in enumerate(completions)]

    assert quality_score(reward, ["p", "q"], ["ab", "abcd"], bonus=[0.5, 1]) == [2.5, 5.0]
    with pytest.raises(AlignkitError, match="non-finite"):
        quality_score(lambda p, c: [1.0, math.inf], ["p", "q"], ["a", "b"])
    assert evol_score([2.0, 3.5], [1.5, 2.0]) == [3.0, 7.0]
    with pytest.raises(ValueError, match="positive"):
        evol_score([2.0, 3.0], [1.0, -0.5])


def test_embed_unit_rows_that_do_not_depend_on_the_batch():
    from alignkit.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok)).train()
    texts = [
        "what is the capital of france ?",
        "hello",
        "tell me a short story about a cat",
        "hello",
        "write a poem about the sky and the sun and the moon",
    ]
    e = embed(model, tok, texts, batch_size=4)
    assert e.shape == (5, 32) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-6)
    assert torch.equal(e[1], e[3])  # the same text gives the same vector
    assert not torch.allclose(e[0], e[2])
    # one at a time (no padding at all) equals batched with padding; float32 matmuls of other shapes
    # may differ in the last bits, hence 1e-5
    alone = embed(model, tok, texts, batch_size=1)
    assert torch.allclose(e, alone, atol=1e-5)
    assert torch.allclose(embed(model, tok, [texts[2]])[0], e[2], atol=1e-5)
    assert model.training  # mode restored
    # the mean of the last hidden states, worked out directly for one text
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    with torch.no_grad():
        h = model.eval().model(input_ids=ids).last_hidden_state[0].mean(0)
    assert torch.allclose(e[0], h / h.norm(), atol=1e-5)
    with pytest.raises(AlignkitError, match="text 1"):
        embed(model, tok, ["hello", ["not", "text"]])


def _bars(svg: str) -> list[tuple[float, float, float]]:
    """(left x, width, height) in SVG points of each histogram bar, in drawing order: the bars are the
    clipped rectangles `<g id="select-scores-patch_N"><path d="M x0 y0 L x1 y0 L x1 y1 L x0 y1 z"`."""
    import re

    rect = re.compile(
        r'<g id="select-scores-patch_\d+">\s*<path d="M ([\d.]+) ([\d.]+) \s*L ([\d.]+) [\d.]+ \s*'
        r'L [\d.]+ ([\d.]+) [^"]*" clip-path'
    )
    return [(float(x0), float(x1) - float(x0), float(y0) - float(y1)) for x0, y0, x1, y1 in rect.findall(svg)]


def test_plot_scores_writes_an_svg(tmp_path):
    out = plot_scores([1.0, 2.0, 2.5, 3.0, 4.0, 5.0], [4.0, 5.0], tmp_path / "plots" / "select.svg")
    text = out.read_text()
    assert out == tmp_path / "plots" / "select.svg"
    assert text.startswith("<svg") and text.rstrip().endswith("</svg>")
    # Legend: counts and means, (1 + 2 + 2.5 + 3 + 4 + 5) / 6 = 2.9167 and (4 + 5) / 2 = 4.5 at 3 digits.
    assert "<!-- all (n=6, mean 2.92) -->" in text and "<!-- selected (n=2, mean 4.5) -->" in text
    # Bins: 6 scores give max(5, int(sqrt(6))) = 5 bins over [1, 5], each 0.8 wide: [1, 1.8) [1.8, 2.6)
    # [2.6, 3.4) [3.4, 4.2) [4.2, 5]. All: 1, 2 (2.0 and 2.5), 1, 1, 1; selected: 0, 0, 0, 1 (4.0), 1 (5.0).
    bars = _bars(text)
    assert len(bars) == 10
    unit = bars[0][2]  # the height of one example
    assert [round(h / unit, 6) for _, _, h in bars] == [1, 2, 1, 1, 1, 0, 0, 0, 1, 1]
    width = bars[0][1]
    assert all(abs(w - width) < 1e-3 for _, w, _ in bars)  # equal bins (SVG coordinates have 6 decimals)
    assert [round((x - bars[0][0]) / width, 3) for x, _, _ in bars] == [0, 1, 2, 3, 4] * 2  # the same bins
    with pytest.raises(ValueError, match="empty"):
        plot_scores([], [], tmp_path / "x.svg")
