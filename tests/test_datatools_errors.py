"""The data tools refuse what they cannot do with a message and exit code 2, and never leave a state
that mixes two runs: --resume checks the inputs' contents, a configuration error leaves no `.partial`
files, --resume on a finished output does nothing, `iterate.json` is written atomically and a damaged
one is named, and records without the needed columns are named by file:line and column."""

import json
import os
import re
from pathlib import Path

import pytest
from conftest import write_jsonl

from alignkit.cli import main
from alignkit.datatools import jobs
from alignkit.datatools.jobs import RecordLog
from alignkit.errors import AlignkitError

ROWS = [{"prompt": f"what is {i} yes ?", "completion": "one " * (i % 4 + 1)} for i in range(20)]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _model(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--max-new-tokens", "4", "--no-progress"]


def _left_by(out):
    """Every file a command writes beside OUT (OUT itself, its partial log and settings, summaries)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.lstrip(".").startswith(out.name))


def _interrupt_second_call(monkeypatch, module, name):
    """Make `module.name` stop the run (KeyboardInterrupt) on its second call; returns the call list."""
    real, calls = getattr(module, name), []

    def flaky(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else None)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, flaky)
    return calls


# --- 1. --resume checks the contents of the inputs, not only their paths ----------------------------


def test_resume_refuses_an_input_edited_since_the_interrupted_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import alignkit.inference.rewrite as rw

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    original = data.read_bytes()
    out = tmp_path / "rw.jsonl"
    args = ["data", "rewrite", "--data", str(data), "--out", str(out), *_model(tiny_model_dir)]
    calls = _interrupt_second_call(monkeypatch, rw, "rewrite")
    with pytest.raises(KeyboardInterrupt):
        main(args)
    log = tmp_path / "rw.jsonl.partial.jsonl"
    assert len(_lines(log)) == 16  # the first chunk is kept

    # the same path, other contents: the last record's prompt edited
    write_jsonl(data, ROWS[:19] + [{"prompt": "what is twenty ?", "completion": "one"}])
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: {data} (--data) changed since the interrupted run started" in err
    assert "16 finished records came from the old contents" in err
    assert "Restore the file and run again with --resume" in err
    assert f"delete {log} and {tmp_path / 'rw.jsonl.partial.json'} and run without --resume" in err
    assert not out.exists() and len(_lines(log)) == 16  # nothing written, nothing lost
    assert len(calls) == 2  # refused before any work

    # the contents restored (a new modification time, the same bytes): the run finishes
    data.write_bytes(original)
    assert main(args + ["--resume"]) == 0
    assert len(calls) == 3  # only the second chunk was done
    assert [r["original_prompt"] for r in _lines(out)] == [r["prompt"] for r in ROWS]
    assert _left_by(out) == ["rw.jsonl", "rw.jsonl.summary.html", "rw.jsonl.summary.md"]


def test_record_log_fingerprints_every_input_it_is_given(tmp_path):
    principles = tmp_path / "p.yaml"
    principles.write_text("principles:\n  - Be brief.\n")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    inputs = {"--data": data, "--principles": principles}
    log = RecordLog(tmp_path / "o.jsonl", {"k": 1}, resume=False, inputs=inputs)
    log.add({"id": 0, "x": 1})
    saved = json.loads((tmp_path / "o.jsonl.partial.json").read_text())
    assert saved[jobs.INPUTS_KEY]["--principles"] == {"path": str(principles), "sha256": jobs.fingerprint(principles)}
    import hashlib

    assert jobs.fingerprint(principles) == hashlib.sha256(principles.read_bytes()).hexdigest()
    assert RecordLog(tmp_path / "o.jsonl", {"k": 1}, resume=True, inputs=inputs).done == {0: {"id": 0, "x": 1}}
    principles.write_text("principles:\n  - Be long.\n")
    with pytest.raises(AlignkitError, match=rf"{re.escape(str(principles))} \(--principles\) changed"):
        RecordLog(tmp_path / "o.jsonl", {"k": 1}, resume=True, inputs=inputs)
    # a directory (a dataset saved with save_to_disk) is hashed file by file
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "a.arrow").write_bytes(b"abc")
    before = jobs.fingerprint(tmp_path / "ds")
    (tmp_path / "ds" / "a.arrow").write_bytes(b"abd")
    assert jobs.fingerprint(tmp_path / "ds") != before
    assert jobs.fingerprint("org/some-hub-dataset") is None  # not local: cannot be read here


# --- 2. a configuration error leaves no partial files ---------------------------------------------------


def test_a_configuration_error_leaves_nothing_and_the_corrected_command_needs_no_resume(
    tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "magpie.jsonl"
    args = [
        "data",
        "synth",
        "--method",
        "magpie",
        "--n",
        "20",
        "--min-words",
        "1",
        "--out",
        str(out),
        *_model(tiny_model_dir),
    ]
    assert main(args + ["--temperature", "0"]) == 2
    assert "--temperature 0.0 with --method magpie samples the same instruction 20 times" in capsys.readouterr().err
    assert _left_by(out) == []
    # found only once the model is loaded (a model directory that is not there): nothing left either
    assert (
        main(
            [
                "data",
                "synth",
                "--method",
                "magpie",
                "--n",
                "20",
                "--model",
                str(tmp_path / "nope"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "nope not found" in capsys.readouterr().err and _left_by(out) == []
    assert main(args) == 0  # corrected: runs without --resume
    assert "summary" in capsys.readouterr().out and out.exists()


def test_an_error_in_the_first_chunk_leaves_nothing(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    (tmp_path / "neg.py").write_text("def neg(prompts, completions, **columns):\n    return [-1.0] * len(prompts)\n")
    out = tmp_path / "sel.jsonl"
    args = [
        "data",
        "select",
        "--data",
        str(data),
        "--budget",
        "2",
        "--min-distance",
        "0.0001",
        "--out",
        str(out),
        *_model(tiny_model_dir),
    ]
    assert main(args + ["--reward", f"{tmp_path / 'neg.py'}:neg"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:1: --reward {tmp_path / 'neg.py'}:neg gives -1.0" in err and "must be a positive number" in err
    assert _left_by(out) == []
    assert main(args) == 0 and len(_lines(out)) == 2  # without --reward, and without --resume


def test_a_partial_that_holds_no_finished_record_is_removed(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    out = tmp_path / "rw.jsonl"
    (tmp_path / "rw.jsonl.partial.jsonl").write_text('{"id": 0, "pro')  # only a torn line
    (tmp_path / "rw.jsonl.partial.json").write_text("{}")
    assert main(["data", "rewrite", "--data", str(data), "--out", str(out), *_model(tiny_model_dir)]) == 0
    assert f"removed {tmp_path / 'rw.jsonl.partial.jsonl'}: it held no finished record" in capsys.readouterr().out
    assert len(_lines(out)) == 3 and _left_by(out) == ["rw.jsonl", "rw.jsonl.summary.html", "rw.jsonl.summary.md"]


# --- 3. --resume on a finished output -------------------------------------------------------------------------


def test_resume_on_a_finished_output_exits_2_and_redoes_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from alignkit.datatools import commands

    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    out = tmp_path / "rw.jsonl"
    args = ["data", "rewrite", "--data", str(data), "--out", str(out), *_model(tiny_model_dir)]
    assert main(args) == 0
    written = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir() if p.is_file()}

    def no_model(args):
        raise AssertionError("a finished output must not load the model")

    monkeypatch.setattr(commands, "_lm", no_model)
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: {out} is already finished" in err
    assert "nothing to resume and nothing was redone" in err and "exit code 2" in err
    assert f"delete {out} (or choose another --out) and run without --resume" in err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir() if p.is_file()} == written


# --- 4. iterate.json --------------------------------------------------------------------------------------------


def _iterate_args(tiny_model_dir, tmp_path, rounds=1):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"what is {i} yes no ?"} for i in range(8)])
    held = write_jsonl(tmp_path / "h.jsonl", [{"prompt": f"what is {i} yes no ?"} for i in range(8, 12)])
    (tmp_path / "chars.py").write_text(
        "def chars(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n"
    )
    return [
        "iterate",
        "recipe=dpo",
        f"model.name_or_path={tiny_model_dir}",
        "train.max_steps=1",
        "train.batch_size=4",
        "data.eval_fraction=0",
        "train.report_to=[]",
        f"cache_dir={tmp_path / 'cache'}",
        "--prompts",
        str(prompts),
        "--heldout",
        str(held),
        "--reward",
        f"{tmp_path / 'chars.py'}:chars",
        "--k",
        "3",
        "--min-margin",
        "1",
        "--max-new-tokens",
        "6",
        "--rounds",
        str(rounds),
        "--out",
        str(tmp_path / "it"),
        "--no-progress",
    ]


def test_iterate_state_survives_a_crash_while_it_is_written(tiny_model_dir, tmp_path, monkeypatch):
    args = _iterate_args(tiny_model_dir, tmp_path, rounds=2)
    state_path = tmp_path / "it" / "iterate.json"
    real, seen = os.replace, []

    def crash_on_second_state(src, dst):  # the machine stops just before round 2's state is in place
        if os.path.basename(dst) == "iterate.json":
            seen.append(json.loads(Path(src).read_text()))
            if len(seen) == 2:
                raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_state)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(os, "replace", real)
    state = json.loads(state_path.read_text())  # whole and valid: round 1 only
    assert [r["round"] for r in state["rounds"]] == [1] and state == seen[0]
    assert [r["round"] for r in seen[1]["rounds"]] == [1, 2]  # what was being written
    assert sorted(p.name for p in (tmp_path / "it").iterdir() if p.name.startswith(".")) == []  # no temp files
    assert main(args) == 0
    rounds = json.loads(state_path.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0] == state["rounds"][0]  # round 1 not redone


DAMAGED_STATES = [
    ('{"settings": {"config": null, "overr', "is not valid JSON"),  # a write cut short
    ("\xff\xfe", "is not valid JSON"),  # not even text
    ('{"settings": {}, "rounds": [{"round": 1}]}', "does not hold alignkit iterate's"),
    ("[]", "does not hold alignkit iterate's"),
]


@pytest.mark.parametrize("text, why", DAMAGED_STATES)
def test_a_damaged_iterate_json_is_named_with_how_to_fix_it(tiny_model_dir, tmp_path, capsys, text, why):
    args = _iterate_args(tiny_model_dir, tmp_path)
    state_path = tmp_path / "it" / "iterate.json"
    state_path.parent.mkdir()
    state_path.write_bytes(text.encode("latin-1"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{state_path} {why}" in err
    assert f"remove {state_path} to run the rounds again from the start" in err
    assert state_path.read_bytes() == text.encode("latin-1")  # left for the user to look at
    assert sorted(os.listdir(state_path.parent)) == ["iterate.json"]  # no round started


def test_iterate_refuses_prompts_edited_since_the_finished_rounds(tmp_path, capsys):
    from alignkit.datatools.iterate import read_state

    held = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "a"}])
    inputs = {"--heldout": {"path": str(held), "sha256": jobs.fingerprint(held)}}
    row = dict.fromkeys(
        ("round", "pairs", "heldout_after", "before", "after", "diff", "ci95", "improved", "worsened", "model"), 1
    )
    path = tmp_path / "iterate.json"
    path.write_text(json.dumps({"settings": {"k": 3}, "inputs": inputs, "rounds": [row]}))
    assert read_state(path, {"k": 3}, inputs)["rounds"] == [row]
    write_jsonl(held, [{"prompt": "b"}])
    edited = {"--heldout": {"path": str(held), "sha256": jobs.fingerprint(held)}}
    with pytest.raises(AlignkitError, match=rf"{re.escape(str(held))} \(--heldout\) changed since the finished rounds"):
        read_state(path, {"k": 3}, edited)
    # a state written before the inputs were recorded carries on, and records them from now on
    path.write_text(json.dumps({"settings": {"k": 3}, "rounds": [row]}))
    assert read_state(path, {"k": 3}, edited)["inputs"] == edited
    assert "does not record the contents of --prompts and --heldout" in capsys.readouterr().out


def test_write_atomic_syncs_before_the_rename(tmp_path, monkeypatch):
    from alignkit.jsonfile import write_atomic

    path = write_atomic(tmp_path / "s.json", {"rounds": [1]})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, {"rounds": [1, 2]})
    assert json.loads(path.read_text()) == {"rounds": [1]} and os.listdir(tmp_path) == ["s.json"]


# --- 5. messages, not tracebacks --------------------------------------------------------------------------------


BAD_RECORDS = [
    ("rewrite", [], {"text": "no prompt"}, ":2: no `prompt` column (the record has `text`)"),
    ("rewrite", [], {"prompt": 5}, ":2: column `prompt` is an int (5); it must be text, or a list"),
    ("rewrite", [], {"prompt": [{"role": "user"}]}, ":2: column `prompt`, message 0 ({'role': 'user'}) is not"),
    ("rewrite", [], {"prompt": [{"role": "system", "content": "x"}]}, ":2: column `prompt` has no user message"),
    ("rewrite", [], ["a", "list"], ":2: a record of --data must be an object with named columns"),
    ("select", ["--budget", "1"], {"completion": "x"}, ":2: no `prompt` column (the record has `completion`)"),
    ("select", ["--budget", "1"], {"prompt": {"text": "x"}}, ":2: column `prompt` is a dict"),
    ("select", ["--budget", "1"], {"prompt": "x", "completion": 3.5}, ":2: column `completion` is a float (3.5)"),
    ("judge", ["--principles", "P"], {"prompt": "x"}, ":2: no `completion` column (the record has `prompt`)"),
    ("judge", ["--principles", "P"], {"prompt": 7, "completion": "x"}, ":2: column `prompt` is an int (7)"),
    (
        "synth",
        ["--method", "self-align", "--principles", "P", "--prompts"],
        {"prompt": ["x"]},
        ":2: column `prompt` is a list (['x']); it must be text",
    ),
]


@pytest.mark.parametrize(
    "command, options, bad, message", BAD_RECORDS, ids=[f"{c}-{i}" for i, (c, *_) in enumerate(BAD_RECORDS)]
)
def test_a_record_without_what_the_command_needs_is_named(
    tiny_model_dir, tmp_path, capsys, command, options, bad, message
):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "what is 1 ?", "completion": "one"}) + "\n" + json.dumps(bad) + "\n")
    principles = tmp_path / "p.yaml"
    principles.write_text("principles:\n  - Be brief.\n")
    options = [str(principles) if o == "P" else o for o in options]
    data_option = [] if command == "synth" else ["--data"]
    out = tmp_path / "o.jsonl"
    assert main(["data", command, *options, *data_option, str(data), "--out", str(out), *_model(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert f"alignkit: error: {data}{message}" in err
    assert _left_by(out) == []


BAD_OPTIONS = [
    (["synth", "--method", "magpie", "--n", "0"], "--n 0: must be at least 1 (instructions to synthesise)"),
    (["synth", "--method", "magpie", "--min-words", "5", "--max-words", "2"], "--min-words 5 is above --max-words 2"),
    (["synth", "--method", "magpie", "--max-repetition", "1.5"], "--max-repetition 1.5: a share of repeated"),
    (["synth", "--method", "magpie", "--dedup-threshold", "0"], "--dedup-threshold 0.0: a MinHash Jaccard"),
    (["synth", "--method", "self-align"], "--method self-align needs --principles FILE"),
    (["select", "--data", "D", "--budget", "0"], "--budget 0: must be at least 1"),
    (["select", "--data", "D", "--budget", "2", "--min-distance", "3"], "--min-distance 3.0: a cosine distance"),
    (["pairs", "--prompts", "D", "--reward", "x.py:f", "--k", "1"], "--k 1: must be at least 2"),
    (["pairs", "--prompts", "D", "--reward", "x.py:f", "--min-margin", "-1"], "--min-margin -1.0: a reward"),
    (["rewrite", "--data", "D", "--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["rewrite", "--data", "D", "--temperature", "-1"], "--temperature -1.0: must be 0 (greedy) or more"),
    (["rewrite", "--data", "D", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["principles", "--pairs", "D", "--heldout-fraction", "1.0"], "--heldout-fraction 1.0: a share of the pairs"),
    (["principles", "--pairs", "D", "--limit", "1"], "--limit 1: must be at least 2"),
]


@pytest.mark.parametrize("argv, message", BAD_OPTIONS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_OPTIONS])
def test_a_bad_option_is_named_before_anything_is_written(tiny_model_dir, tmp_path, capsys, argv, message):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "what is 1 ?", "chosen": "yes", "rejected": "no"}])
    out = tmp_path / "o.jsonl"
    argv = [str(data) if a == "D" else a for a in argv]
    # the model options first, so that a bad one in `argv` comes last and wins
    assert main(["data", argv[0], *_model(tiny_model_dir), *argv[1:], "--out", str(out)]) == 2
    assert f"alignkit: error: {message}" in capsys.readouterr().err
    assert _left_by(out) == []


def test_iterate_options_are_checked_first(tiny_model_dir, tmp_path, capsys):
    args = _iterate_args(tiny_model_dir, tmp_path)
    args[args.index("--rounds") + 1] = "0"
    assert main(args) == 2
    assert "alignkit: error: --rounds 0: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "it").exists()


# --- rewriting keeps each prompt's form ---------------------------------------------------------------------------


def test_rewrite_keeps_text_prompts_text_beside_message_lists(tiny_model_dir, tmp_path):
    rows = [
        {"prompt": "what is 1 ?"},
        {"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "what is 2 ?"}]},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "rw.jsonl"
    assert main(["data", "rewrite", "--data", str(data), "--out", str(out), *_model(tiny_model_dir)]) == 0
    text, conv = _lines(out)
    assert isinstance(text["prompt"], str) and text["original_prompt"] == "what is 1 ?"
    assert conv["prompt"][0] == {"role": "system", "content": "be kind"} and conv["prompt"][1]["role"] == "user"
    assert isinstance(conv["prompt"][1]["content"], str) and conv["original_prompt"] == rows[1]["prompt"]


def test_rewrite_messages_names_a_conversation_it_cannot_rewrite():
    from alignkit.generation.decode import SamplingParams
    from alignkit.inference.rewrite import rewrite_messages

    class NoModel:
        def chat(self, *args, **kwargs):
            raise AssertionError("refused before the model is asked")

    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(AlignkitError, match="conversation 1 is an int, not a list of messages"):
        rewrite_messages(NoModel(), [[{"role": "user", "content": "x"}], 5], params)
    with pytest.raises(AlignkitError, match=r"conversation 0, message 1 \(the last user message\) has no content"):
        rewrite_messages(NoModel(), [[{"role": "system", "content": "s"}, {"role": "user"}]], params)
    with pytest.raises(AlignkitError, match="has a dict as content"):
        rewrite_messages(NoModel(), [[{"role": "user", "content": {"text": "x"}}]], params)
