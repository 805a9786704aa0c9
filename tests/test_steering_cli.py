"""Steering end to end on a tiny model (issue 20): `alignkit steer fit` saves vectors with their
held-out separation, `generate --steer` at strength 0 is unsteered generation, and `eval
--steer-sweep` / `--representation-layers` measure, fit and plot."""

import json

import pytest
import torch

from alignkit.cli import main
from alignkit.eval.steering import fits


def test_fits_recover_a_line_and_a_parabola():
    s = [0.0, 1.0, 2.0, 4.0]
    f = fits(s, [1.0 + 2.0 * x for x in s], [0.5 * x * x for x in s])
    assert f["alignment_linear"]["coef"] == pytest.approx([2.0, 1.0]) and f["alignment_linear"]["r2"] == pytest.approx(1.0)
    assert f["helpfulness_quadratic"]["coef"] == pytest.approx([0.5, 0.0, 0.0], abs=1e-9)
    assert f["helpfulness_linear"]["r2"] < 0.99  # a parabola is not a line


def test_steer_fit_generate_and_sweep(tiny_model_dir, pairs_file, sft_file, tmp_path, capsys):
    vec = tmp_path / "vec"
    assert main(["steer", "fit", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--layers", "0", "1",
                 "--limit", "20", "--out", str(vec)]) == 0
    meta = json.loads((vec / "steering.json").read_text())
    assert meta["layers"] == [0, 1] and set(meta["heldout"]) == {"0", "1"}
    assert all(0.0 <= v["accuracy"] <= 1.0 for v in meta["heldout"].values())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {i} ?"}) + "\n" for i in range(3)))
    outs = {}
    for name, extra in (("plain", []), ("zero", ["--steer", str(vec), "--steer-strength", "0"]),
                        ("strong", ["--steer", str(vec), "--steer-strength", "50"])):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--reward",
                     '{"name": "length", "max_words": 50}', "--strategy", "sample", "--temperature", "0",
                     "--max-new-tokens", "8", "--output", str(out), *extra]) == 0
        outs[name] = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    assert outs["zero"] == outs["plain"] and outs["strong"] != outs["plain"]
    ev = tmp_path / "ev"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--steer", str(vec),
                 "--steer-sweep", "0,1,2,4", "--helpfulness", str(sft_file), "--representation-layers", "0,1",
                 "--num-prompts", "8", "--output-dir", str(ev), "--no-progress"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    rows = m["steering"]["rows"]
    assert [r["strength"] for r in rows] == [0.0, 1.0, 2.0, 4.0] and rows[0]["helpfulness_loss"] == 0.0
    assert set(m["steering"]["fits"]) == {"alignment_linear", "helpfulness_quadratic", "helpfulness_linear"}
    assert m["representation"]["layers"] == [0, 1] and len(m["representation"]["probe_accuracy"]) == 2
    html = (ev / "report.html").read_text()
    assert 'data-plot="steering"' in html and 'data-plot="representation"' in html


def test_eval_reports_best_of_n_win_rates(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {i} yes ?"}) + "\n" for i in range(4)))
    (tmp_path / "chars.py").write_text("def chars(prompts, completions, **c):\n    return [float(len(x)) for x in completions]\n")
    ev = tmp_path / "ev"
    assert main(["eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--prompts", str(prompts),
                 "--reward", f"{tmp_path / 'chars.py'}:chars", "--bon-n", "2,4", "--calibration-k", "6",
                 "--max-new-tokens", "6", "--output-dir", str(ev), "--no-progress", "--no-report"]) == 0
    bon = json.loads((ev / "metrics.json").read_text())["best_of_n"]
    assert bon["calibration_k"] == 6 and bon["n_prompts"] == 4 and set(bon["by_n"]) == {"2", "4"}
    for n, row in bon["by_n"].items():
        assert row["reference_itself"] == pytest.approx(int(n) / (int(n) + 1))
        lo, hi = row["vs_reference_sample"]["ci95"]
        assert 0.0 <= lo <= row["vs_reference_sample"]["value"] <= hi <= 1.0
    # best-of-4 of a policy beats one reference sample at least as often as best-of-2 does
    assert bon["by_n"]["4"]["vs_reference_sample"]["value"] >= bon["by_n"]["2"]["vs_reference_sample"]["value"]


# ---------------------------------------------------------------------------------------------
# User mistakes end with exit code 2 and a message naming the option, layer or file


def _vectors_dir(path, vectors):
    """A steering directory for the tiny model of `tiny_model_dir` (same seed, same fingerprint)."""
    from alignkit.inference.steering import model_fingerprint, save_vectors
    from alignkit.testing import tiny_model, tiny_tokenizer

    model = tiny_model("llama", vocab_size=len(tiny_tokenizer()), seed=0)
    return save_vectors(path, vectors, {"fingerprint": model_fingerprint(model), "method": "mean_diff", "source": "t"})


def _generate(model_dir, tmp_path, *extra):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {i} ?"}) + "\n" for i in range(2)))
    return main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--reward",
                 '{"name": "length", "max_words": 50}', "--strategy", "sample", "--temperature", "0",
                 "--max-new-tokens", "4", *extra])


@pytest.mark.parametrize("layer", ["5", "-1"])
def test_steer_fit_refuses_a_layer_the_model_does_not_have(tiny_model_dir, pairs_file, tmp_path, capsys, layer):
    assert main(["steer", "fit", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--layers", "0", layer,
                 "--limit", "10", "--out", str(tmp_path / "vec")]) == 2
    err = capsys.readouterr().err
    assert f"layer {layer} is out of range" in err and "has 2 decoder blocks, blocks 0..1" in err, err
    assert not (tmp_path / "vec").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_generate_refuses_a_non_finite_steer_strength(tiny_model_dir, tmp_path, capsys, value):
    vec = _vectors_dir(tmp_path / "vec", {0: torch.ones(32)})
    assert _generate(tiny_model_dir, tmp_path, "--steer", str(vec), f"--steer-strength={value}") == 2  # = for -inf
    err = capsys.readouterr().err
    assert f"--steer-strength={float(value)!r}: the steering strength must be a finite number" in err, err


def test_eval_refuses_a_non_finite_steer_sweep(tiny_model_dir, pairs_file, sft_file, tmp_path, capsys):
    vec = _vectors_dir(tmp_path / "vec", {0: torch.ones(32)})
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--steer", str(vec),
                 "--steer-sweep", "nan,1", "--helpfulness", str(sft_file), "--output-dir", str(tmp_path / "ev"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--steer-sweep=nan: the steering strength must be a finite number" in err, err
    assert not (tmp_path / "ev").exists()  # refused as the arguments were read, before any evaluation


def test_generate_refuses_steering_vectors_holding_nan(tiny_model_dir, tmp_path, capsys):
    # these used to run to exit 0 with empty completions and reward 0
    bad = torch.ones(32)
    bad[7] = float("nan")
    vec = _vectors_dir(tmp_path / "vec", {0: torch.ones(32), 1: bad})
    out = tmp_path / "out.jsonl"
    assert _generate(tiny_model_dir, tmp_path, "--steer", str(vec), "--output", str(out)) == 2
    err = capsys.readouterr().err
    assert f"{vec / 'steering.safetensors'}: the vector for layer 1 holds NaN or infinite values" in err, err
    assert "alignkit steer fit" in err and not out.exists()


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_broken_or_missing_steering_directory_is_named(tiny_model_dir, pairs_file, tmp_path, capsys, command):
    vec = _vectors_dir(tmp_path / "vec", {0: torch.ones(32)})
    (vec / "steering.json").write_text('{"fingerprint": ')
    for steer_dir, what in ((vec, f"{vec / 'steering.json'}: not valid JSON"),
                            (tmp_path / "nowhere", f"steering vectors {tmp_path / 'nowhere'}: no such directory")):
        if command == "generate":
            rc = _generate(tiny_model_dir, tmp_path, "--steer", str(steer_dir))
        else:
            rc = main(["eval", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--steer", str(steer_dir),
                       "--output-dir", str(tmp_path / "ev"), "--no-progress", "--no-report"])
        err = capsys.readouterr().err
        assert rc == 2 and what in err and "alignkit steer fit" in err, err


@pytest.mark.parametrize("option,value", [("--bon-n", "nan"), ("--bon-n", "1.5"), ("--bon-n", "0"),
                                          ("--representation-layers", "nan"), ("--representation-layers", "-1")])
def test_eval_refuses_counts_and_layers_that_are_not_whole_numbers(option, value, tiny_model_dir, tmp_path, capsys):
    from alignkit.cli import main
    from conftest import toy_pairs, write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(4))
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(pairs), option, value,
                 "--output-dir", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert option in err and "whole numbers" in err, err
