"""Mask-DPO data: sentence labels -> token masks -> masked sums -> training."""

import pytest
import torch
from conftest import base_overrides, write_jsonl

from alignkit.config import load_config
from alignkit.data.batching import collate_pairs
from alignkit.data.masked import parse_masked_record, tokenize_masked_pairs
from alignkit.errors import DataError
from alignkit.logprobs import segment_logps
from alignkit.testing import tiny_model, tiny_tokenizer
from alignkit.train import loop
from alignkit.train.metrics import read_metrics

REC = {
    "prompt": "what is 2 plus 3 ?",
    "chosen_sentences": [
        {"text": "the answer is 5 .", "correct": True},
        {"text": " the sky is red .", "correct": False},
    ],
    "rejected_sentences": [
        {"text": "the answer is 6 .", "correct": False},
        {"text": " the sky is blue .", "correct": True},
    ],
}


def test_masks_cover_exactly_the_scored_sentences():
    tok = tiny_tokenizer()
    ex = parse_masked_record(REC, "m.jsonl:1")
    assert ex.chosen_spans == ((0, 17),) and ex.rejected_spans == ((0, 17),)
    (item,), _ = tokenize_masked_pairs([ex], tok, 128)
    chosen_tokens = tok.convert_ids_to_tokens(item.chosen_ids)
    scored = [t for t, m in zip(chosen_tokens, item.chosen_mask) if m]
    assert scored == ["the", "answer", "is", "5", "."]  # not "the sky is red", not <|im_end|>
    assert chosen_tokens[-1] == "<|im_end|>" and item.chosen_mask[-1] is False
    scored_r = [t for t, m in zip(tok.convert_ids_to_tokens(item.rejected_ids), item.rejected_mask) if m]
    assert scored_r == ["the", "answer", "is", "6", "."]


def test_masked_sums_equal_hand_masked_forward():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok)).eval()
    (item,), _ = tokenize_masked_pairs([parse_masked_record(REC, "m:1")], tok, 128)
    with torch.no_grad():
        out = segment_logps(model, collate_pairs([item], tok.pad_token_id))
        ids = torch.tensor([item.prompt_ids + item.chosen_ids])
        lp = torch.log_softmax(model(ids).logits, -1)[0]
    n = len(item.prompt_ids)
    want = sum(float(lp[n + j - 1, t]) for j, t in enumerate(item.chosen_ids) if item.chosen_mask[j])
    assert abs(float(out.logps[0]) - want) < 1e-5
    assert int(out.counts[0]) == 5


def test_masked_record_errors():
    with pytest.raises(DataError, match=r"m:2: sentence 1 of field 'chosen_sentences'"):
        parse_masked_record({**REC, "chosen_sentences": [{"text": "a", "correct": True}, {"text": "b"}]}, "m:2")
    with pytest.raises(DataError, match="nothing to learn"):
        parse_masked_record(
            {
                **REC,
                "chosen_sentences": [{"text": "a", "correct": False}],
                "rejected_sentences": [{"text": "b", "correct": True}],
            },
            "m:3",
        )
    with pytest.raises(DataError, match="m:4: field 'chosen_sentences' is missing"):
        parse_masked_record({"prompt": "x", "rejected_sentences": REC["rejected_sentences"]}, "m:4")


def test_mask_dpo_training_moves_masked_margin(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "m.jsonl", [REC] * 16)
    cfg = load_config(
        None,
        base_overrides(tiny_model_dir, data, tmp_path / "r", tmp_path / "c")
        + [
            "recipe=masked",
            "loss.name=mask_dpo",
            "train.max_steps=6",
            "train.learning_rate=5e-3",
            "train.batch_size=4",
            "data.eval_fraction=0",
        ],
    )
    rows = read_metrics(loop.train(cfg, progress=False).run_dir, "train")
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert rows[-1]["rewards/margins"] > 0.2 and rows[-1]["loss"] < 0.6  # from 0 and 0.693
