"""D2O on negative-only data: loading, the [negative, K samples] batch layout, sampling and its
cache, the reference table, and a tiny-model run that moves the negative below the samples."""

import json
import math
import shutil

import pytest
import torch
from conftest import base_overrides, toy_pairs, write_jsonl

from alignkit.config import load_config
from alignkit.data.batching import collate_groups
from alignkit.data.negative import TokenizedGroup, load_negative_examples, parse_negative_record
from alignkit.errors import DataError
from alignkit.logprob_passes import segment_table as example_columns
from alignkit.train import loop
from alignkit.train.metrics import read_metrics


@pytest.fixture
def negative_file(tmp_path):
    return write_jsonl(
        tmp_path / "neg.jsonl", [{"prompt": r["prompt"], "rejected": r["rejected"]} for r in toy_pairs(16)]
    )


def _cfg(tiny_model_dir, data, tmp_path, *extra, out="run"):
    return load_config(
        None,
        base_overrides(tiny_model_dir, data, tmp_path / out, tmp_path / "cache")
        + [
            "recipe=negative",
            "loss.name=d2o",
            "train.learning_rate=5e-3",
            "train.batch_size=8",
            "train.warmup_ratio=0",
            "train.lr_schedule=constant",
            "data.eval_fraction=0",
            "generation.num_samples=3",
            "generation.max_new_tokens=6",
            *extra,
        ],
    )


def test_negative_record_validation(tmp_path):
    ex = parse_negative_record({"prompt": "hi", "rejected": "go away"}, "f:1")
    assert ex.rejected == ({"role": "assistant", "content": "go away"},) and ex.plain_text
    with pytest.raises(DataError, match="f:2: field 'rejected' is missing .*data.columns"):
        parse_negative_record({"prompt": "hi", "completion": "x"}, "f:2")
    with pytest.raises(DataError, match="f:3: .*empty completion"):
        parse_negative_record({"prompt": "hi", "rejected": "  "}, "f:3")
    path = write_jsonl(
        tmp_path / "n.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "", "rejected": "d"}]
    )
    result = load_negative_examples(str(path), on_bad_record="skip")  # a pairs file works; chosen unread
    assert len(result.examples) == 1 and result.skipped[0][0].endswith("n.jsonl:2")


def test_group_layout_maps_segments_to_columns():
    groups = [TokenizedGroup([1, 2], [[3], [4, 5], [6]], index=7), TokenizedGroup([1], [[8, 9], [10], [11]], index=2)]
    batch = collate_groups(groups, pad_id=0)
    assert batch.input_ids.shape == (6, 4) and batch.num_segments == 6
    # Row s*B + i holds completion s of group i, scored into segment s*B + i.
    assert batch.input_ids[1].tolist() == [1, 8, 9, 0] and batch.input_ids[4].tolist() == [1, 2, 6, 0]
    assert batch.segment_ids[3].tolist() == [-1, 3, -1, -1]
    table = example_columns(torch.arange(6.0), 2)
    assert table.tolist() == [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]  # [B, S]: example i, completion s


def test_d2o_pushes_the_negative_below_the_samples(tiny_model_dir, negative_file, tmp_path):
    result = loop.train(_cfg(tiny_model_dir, negative_file, tmp_path, "train.max_steps=8"), progress=False)
    rows = read_metrics(result.run_dir, "train")
    # Step 1: policy == reference, so the logit is 0 and the loss log 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert rows[-1]["rewards/margins"] > 0.5
    assert rows[-1]["logps/rejected"] < rows[0]["logps/rejected"] - 1.0
    gap = [r["logps/samples"] - r["logps/rejected"] for r in rows]
    assert gap[-1] > gap[0] + 1.0


def test_samples_are_cached_and_resume_is_exact(tiny_model_dir, negative_file, tmp_path, capsys):
    args = ["train.max_steps=4", "train.save_every=2", "train.batch_size=4"]
    full = loop.train(_cfg(tiny_model_dir, negative_file, tmp_path, *args, out="full"), progress=False)
    files = list((tmp_path / "cache" / "samples").glob("*.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(rows) == 16 and all(len(r) == 3 for r in rows)
    part = _cfg(tiny_model_dir, negative_file, tmp_path, *args, out="part")
    capsys.readouterr()
    loop.train(part, progress=False)
    assert "reusing cache" in capsys.readouterr().out  # same model, prompts, seed: same samples
    shutil.rmtree(f"{part.output_dir}/checkpoint-4")
    resumed = loop.train(part, resume=True, progress=False)
    assert abs(full.train_metrics["loss"] - resumed.train_metrics["loss"]) < 1e-6


def test_cached_reference_equals_live(tiny_model_dir, negative_file, tmp_path):
    cached = loop.train(_cfg(tiny_model_dir, negative_file, tmp_path, "train.max_steps=3", out="c"), progress=False)
    live = loop.train(
        _cfg(tiny_model_dir, negative_file, tmp_path, "train.max_steps=3", "reference=live", out="l"), progress=False
    )
    assert cached.train_metrics["loss"] == pytest.approx(live.train_metrics["loss"], abs=1e-5)
    assert cached.train_metrics["rewards/margins"] == pytest.approx(live.train_metrics["rewards/margins"], abs=1e-5)


def test_paired_loss_refused_by_negative_recipe(tiny_model_dir, negative_file, tmp_path):
    from alignkit.errors import ConfigError

    with pytest.raises(ConfigError, match="needs paired data"):
        loop.train(_cfg(tiny_model_dir, negative_file, tmp_path, "loss.name=dpo", "train.max_steps=1"), progress=False)
