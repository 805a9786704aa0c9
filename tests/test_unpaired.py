"""Unpaired data (KTO, BCO) and BCO's running reward shift, end to end on a tiny model."""

import shutil

import pytest
from conftest import base_overrides, toy_pairs, write_jsonl

from alignkit.config import load_config
from alignkit.data.unpaired import load_unpaired_examples, parse_unpaired_record
from alignkit.errors import DataError
from alignkit.train import loop
from alignkit.train.metrics import read_metrics


@pytest.fixture
def unpaired_file(tmp_path):
    rows = []
    for i, r in enumerate(toy_pairs(40)):
        good = i % 2 == 0
        rows.append({"prompt": r["prompt"], "completion": r["chosen"] if good else r["rejected"], "label": good})
    return write_jsonl(tmp_path / "unpaired.jsonl", rows)


def _cfg(tiny_model_dir, data, tmp_path, *extra, out="run"):
    return load_config(
        None,
        base_overrides(tiny_model_dir, data, tmp_path / out, tmp_path / "cache")
        + [
            "recipe=unpaired",
            "train.learning_rate=5e-3",
            "train.batch_size=8",
            "train.warmup_ratio=0",
            "data.eval_fraction=0",
            *extra,
        ],
    )


@pytest.mark.parametrize("loss", ["kto", "bco"])
def test_unpaired_losses_raise_desirable_and_lower_undesirable(loss, tiny_model_dir, unpaired_file, tmp_path):
    result = loop.train(
        _cfg(tiny_model_dir, unpaired_file, tmp_path, f"loss.name={loss}", "train.max_steps=10"), progress=False
    )
    rows = read_metrics(result.run_dir, "train")
    first, last = rows[0], rows[-1]
    assert last["rewards/desirable"] > 0 > last["rewards/undesirable"]  # desirable up, undesirable down
    assert last["loss"] < first["loss"]
    assert last["logps/desirable"] > first["logps/desirable"]


def test_kto_first_step_loss_is_half(tiny_model_dir, unpaired_file, tmp_path):
    """At step 1 policy == reference, so r = z0 = 0 and each example's loss is 1 - sigmoid(0) = 0.5."""
    result = loop.train(
        _cfg(tiny_model_dir, unpaired_file, tmp_path, "loss.name=kto", "train.max_steps=1"), progress=False
    )
    assert read_metrics(result.run_dir, "train")[0]["loss"] == pytest.approx(0.5, abs=1e-6)


def test_bco_pair_trains_and_resumes_exactly(tiny_model_dir, pairs_file, tmp_path):
    args = ["recipe=dpo", "loss.name=bco_pair", "train.max_steps=6", "train.save_every=3", "train.batch_size=4"]
    full = loop.train(_cfg(tiny_model_dir, pairs_file, tmp_path, *args, out="full"), progress=False)
    rows = read_metrics(full.run_dir, "train")
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    part = _cfg(tiny_model_dir, pairs_file, tmp_path, *args, out="part")
    loop.train(part, progress=False)
    shutil.rmtree(f"{part.output_dir}/checkpoint-6")
    resumed = loop.train(part, resume=True, progress=False)  # needs the running shift restored
    assert abs(full.train_metrics["loss"] - resumed.train_metrics["loss"]) < 1e-6


def test_unpaired_record_validation(tmp_path):
    ex = parse_unpaired_record({"prompt": "hi", "completion": "hello", "label": "False"}, "f.csv:line 2")
    assert ex.desirable is False and ex.completion == ({"role": "assistant", "content": "hello"},)
    with pytest.raises(DataError, match=r"f:3: field 'label' must be true \(desirable\) or false"):
        parse_unpaired_record({"prompt": "hi", "completion": "x", "label": "maybe"}, "f:3")
    with pytest.raises(DataError, match="f:4: field 'completion' is missing"):
        parse_unpaired_record({"prompt": "hi", "label": True}, "f:4")
    path = write_jsonl(
        tmp_path / "u.jsonl",
        [{"prompt": "a", "completion": "b", "label": 1}, {"prompt": "a", "completion": "", "label": 0}],
    )
    result = load_unpaired_examples(str(path), on_bad_record="skip")
    assert len(result.examples) == 1 and result.skipped[0][0].endswith("u.jsonl:2")


def test_paired_loss_refused_by_unpaired_recipe(tiny_model_dir, unpaired_file, tmp_path):
    from alignkit.errors import ConfigError

    with pytest.raises(ConfigError, match="needs paired data"):
        loop.train(_cfg(tiny_model_dir, unpaired_file, tmp_path, "loss.name=dpo", "train.max_steps=1"), progress=False)
