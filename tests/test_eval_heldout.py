"""`alignkit eval --run` evaluates exactly the pairs the run held out, loaded with the run's data settings.

Before `heldout.json`, eval re-derived the split from the whole file without `data.limit`,
`data.columns`, `data.split`, `data.max_length` and `data.on_bad_record`: a run with `data.limit`
got training pairs and pairs beyond the limit evaluated as held out, and a column mapping failed.
"""

import json

from conftest import base_overrides, toy_pairs, write_jsonl

from alignkit.cli import build_parser, main
from alignkit.commands.eval import eval_config_from_args
from alignkit.config import load_config
from alignkit.data.formats import load_preference_examples
from alignkit.data.splits import split_heldout
from alignkit.train import loop

EVAL_ARGS = ["--num-prompts", "2", "--max-new-tokens", "2", "--no-progress", "--no-report"]


def _train(model_dir, data, tmp_path, *extra):
    cfg = load_config(
        None,
        base_overrides(model_dir, data, tmp_path / "run", tmp_path / "c")
        + ["train.max_steps=1", "train.batch_size=4", "train.learning_rate=1e-3", "train.warmup_ratio=0", *extra],
    )
    loop.train(cfg, progress=False)
    return tmp_path / "run"


def _pair_sources(run):
    return json.loads((run / "eval" / "metrics.json").read_text())


def test_eval_run_uses_exactly_the_heldout_pairs_of_a_limited_run(tiny_model_dir, tmp_path):
    # Distinct prompts, so that every pair can be told apart by its text as well as its source.
    rows = [dict(r, prompt=f"{r['prompt']} {i}") for i, r in enumerate(toy_pairs(40))]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    run = _train(tiny_model_dir, data, tmp_path, "data.limit=20", "data.eval_fraction=0.25", "seed=3")
    # What training held out: the same function over the first 20 pairs, with the run's seed.
    train, held = split_heldout(load_preference_examples(str(data)).examples[:20], 0.25, 3)
    expected = [e.source for e in held]
    assert len(expected) == 5 and all(int(s.rsplit(":", 1)[1]) <= 20 for s in expected)

    assert main(["eval", "--run", str(run), *EVAL_ARGS]) == 0
    m = _pair_sources(run)
    assert m["n_pairs"] == 5
    assert m["pair_sources"] == expected  # the held-out pairs, in the recorded order
    assert not set(m["pair_sources"]) & {e.source for e in train}
    record = json.loads((run / "heldout.json").read_text())
    assert record["sources"] == expected and record["num_train"] == 15 and record["limit"] == 20


def test_eval_run_reads_the_runs_columns_and_bad_records(tiny_model_dir, tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in toy_pairs(20)]
    rows.insert(3, {"question": "what is 1 plus 1 ?"})  # a bad record the run skipped (line 4)
    data = write_jsonl(tmp_path / "renamed.jsonl", rows)
    run = _train(
        tiny_model_dir,
        data,
        tmp_path,
        "data.columns={prompt: question, chosen: good, rejected: bad}",
        "data.on_bad_record=skip",
        "data.eval_fraction=0.2",
        "data.max_length=48",
    )
    assert main(["eval", "--run", str(run), *EVAL_ARGS]) == 0
    m = _pair_sources(run)
    record = json.loads((run / "heldout.json").read_text())
    assert m["n_pairs"] == 4 and m["pair_sources"] == record["sources"] and f"{data}:4" not in record["sources"]
    cfg = eval_config_from_args(build_parser().parse_args(["eval", "--run", str(run), *EVAL_ARGS]))
    assert (cfg.columns, cfg.on_bad_record) == ({"prompt": "question", "chosen": "good", "rejected": "bad"}, "skip")
    # The held-out pairs are tokenized as the run tokenized them, unless --max-length says otherwise.
    assert cfg.max_length == 48 and m["max_length"] == 48
    cfg = eval_config_from_args(build_parser().parse_args(["eval", "--run", str(run), "--max-length", "96"]))
    assert cfg.max_length == 96


def test_eval_run_with_a_separate_eval_file_uses_the_runs_settings(tiny_model_dir, tmp_path):
    def renamed(rows):
        return [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]

    train_file = write_jsonl(tmp_path / "train.jsonl", renamed(toy_pairs(12)))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", renamed(toy_pairs(3, seed=1)))
    run = _train(
        tiny_model_dir,
        train_file,
        tmp_path,
        f"data.eval={eval_file}",
        "data.columns={prompt: question, chosen: good, rejected: bad}",
    )
    assert main(["eval", "--run", str(run), *EVAL_ARGS]) == 0
    m = _pair_sources(run)
    assert m["data"] == str(eval_file) and m["pair_sources"] == [f"{eval_file}:{i}" for i in (1, 2, 3)]


def test_eval_run_refuses_a_missing_or_stale_record(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(20))
    run = _train(tiny_model_dir, data, tmp_path, "data.eval_fraction=0.2")
    _, held = split_heldout(load_preference_examples(str(data)).examples, 0.2, 0)
    missing = [e.source for e in held if int(e.source.rsplit(":", 1)[1]) > 10]
    assert missing  # seed 0 holds out some pair past line 10
    # The data file lost lines since training: a recorded source is no longer there.
    write_jsonl(data, toy_pairs(20)[:10])
    assert main(["eval", "--run", str(run), *EVAL_ARGS]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and missing[0] in err and "heldout.json" in err
    (run / "heldout.json").unlink()  # a run made before runs recorded their held-out pairs
    assert main(["eval", "--run", str(run), *EVAL_ARGS]) == 2
    err = capsys.readouterr().err
    assert "heldout.json" in err and "--data" in err
