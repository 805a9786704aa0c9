"""`alignkit data show` marks exactly the tokens each loss scores.

Before: Mask-DPO examples showed every completion token as scored (the sentence masks were
ignored), and the unpaired recipe's mismatched KL-baseline completion was shown as
"rejected (scored)", although KTO only reads it for its detached KL estimate and BCO not at all.
"""

import re

import pytest
from conftest import base_overrides, toy_pairs, write_jsonl

from alignkit.cli import main

ROW = re.compile(r"^\s+(\d+)\s+(\d+)\s+(yes|no)\s+(.+)$")


def _blocks(out: str) -> dict:
    """{header line of each completion: [(position, scored, token text), ...] of its completion rows}."""
    blocks, lines = {}, out.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("prompt: "):
            continue
        n_prompt = int(line.split()[1])
        header = lines[i + 2]
        rows = []
        for row in lines[i + 6 :]:
            m = ROW.match(row)
            if not m:
                break
            if int(m.group(1)) >= n_prompt:
                rows.append((int(m.group(1)), m.group(3) == "yes", eval(m.group(4))))
        blocks[header] = rows
    return blocks


MASKED = {
    "prompt": "what is 2 plus 3 ?",
    "chosen_sentences": [
        {"text": "the answer is 5 .", "correct": True},
        {"text": " the sky is red .", "correct": False},
    ],
    "rejected_sentences": [
        {"text": "the sky is blue .", "correct": True},
        {"text": " the answer is 6 .", "correct": False},
    ],
}


def test_masked_example_scores_only_the_labelled_sentences(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "m.jsonl", [MASKED] * 4)
    assert (
        main(
            [
                "data",
                "show",
                *base_overrides(tiny_model_dir, data, tmp_path / "r", tmp_path / "c"),
                "recipe=masked",
                "loss.name=mask_dpo",
                "data.eval_fraction=0",
            ]
        )
        == 0
    )
    blocks = _blocks(capsys.readouterr().out)
    (chosen_head, chosen), (rejected_head, rejected) = blocks.items()
    # Only chosen's correct sentence and rejected's incorrect one; never the end-of-turn token.
    assert [t for _, s, t in chosen if s] == ["the", "answer", "is", "5", "."]
    assert [t for _, s, t in rejected if s] == ["the", "answer", "is", "6", "."]
    assert [t for _, s, t in chosen if not s] == ["the", "sky", "is", "red", "."] + [chosen[-1][2]]
    assert chosen[-1][2] == rejected[-1][2] == "<|im_end|>"
    assert chosen_head.startswith("chosen: 11 tokens (5 scored") and rejected_head.startswith(
        "rejected: 11 tokens (5 scored"
    )


@pytest.mark.parametrize("loss, reads_kl", [("kto", True), ("bco", False)])
def test_unpaired_example_scores_its_completion_not_the_kl_baseline(loss, reads_kl, tiny_model_dir, tmp_path, capsys):
    rows = [
        {"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
        for i, r in enumerate(toy_pairs(6))
    ]
    data = write_jsonl(tmp_path / "u.jsonl", rows)
    assert (
        main(
            [
                "data",
                "show",
                *base_overrides(tiny_model_dir, data, tmp_path / "r", tmp_path / "c"),
                "recipe=unpaired",
                f"loss.name={loss}",
                "data.eval_fraction=0",
                "--index",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    (head, completion), (kl_head, kl) = _blocks(out).items()
    assert completion and all(s for _, s, _ in completion)
    # The KL baseline is example 2's completion after this prompt, and no loss scores it.
    assert kl and not any(s for _, s, _ in kl) and "".join(t for _, _, t in kl).startswith("sorry")
    assert head.startswith("completion (desirable):") and head.endswith("(scored)")
    assert kl_head.startswith("KL baseline") and "not scored" in kl_head
    if reads_kl:
        assert "kto reads it only for its KL estimate" in kl_head and "no gradient" in kl_head
    else:
        assert "bco does not read it" in kl_head
    assert "rejected" not in out and "(scored)" not in out.split("KL baseline")[1]


def test_reward_model_example_reads_one_token_per_completion(tiny_model_dir, pairs_file, tmp_path, capsys):
    """A reward model's loss reads its reward at each completion's last non-pad token (here the end of turn)."""
    assert (
        main(
            [
                "data",
                "show",
                *base_overrides(tiny_model_dir, pairs_file, tmp_path / "r", tmp_path / "c"),
                "recipe=reward",
                "data.eval_fraction=0",
            ]
        )
        == 0
    )
    (chosen_head, chosen), (rejected_head, rejected) = _blocks(capsys.readouterr().out).items()
    assert [t for _, s, t in chosen if s] == [t for _, s, t in rejected if s] == ["<|im_end|>"]
    assert chosen[-1][1] and rejected[-1][1]
    assert "(1 scored: the reward is read at the last non-pad token)" in chosen_head
