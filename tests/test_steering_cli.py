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
    line = fits(s, [1.0 + 2.0 * x for x in s], "")
    assert line["line"]["coef"] == pytest.approx([2.0, 1.0]) and line["line"]["r2"] == pytest.approx(1.0)
    parabola = fits(s, [0.5 * x * x for x in s], "")
    assert parabola["quadratic"]["coef"] == pytest.approx([0.5, 0.0, 0.0], abs=1e-9)
    assert parabola["line"]["r2"] < 0.99  # a parabola is not a line


def test_the_papers_forms_are_recovered_and_told_apart():
    """tanh for a saturating behaviour rate, h0/(1 + k s^2) for helpfulness (Wolf et al.,
    arXiv 2401.16332): exact curves are fitted (R^2 ~ 1, parameters within the grid's step), and
    the other forms fit them worse."""
    import numpy as np

    s = np.array([-8, -4, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 4, 8], dtype=float)
    behaviour = 0.9 * np.tanh(0.7 * s) + 0.05
    f = fits(s.tolist(), behaviour.tolist(), "tanh")
    assert f["tanh"]["r2"] > 0.9999 and f["tanh"]["A"] == pytest.approx(0.9, rel=0.05)
    assert f["tanh"]["k"] == pytest.approx(0.7, rel=0.05) and f["tanh"]["B"] == pytest.approx(0.05, abs=0.02)
    assert f["line"]["r2"] < 0.9 and f["quadratic"]["r2"] < 0.9  # saturation is not a line
    accuracy = 0.6 / (1 + 0.05 * s**2)
    g = fits(s.tolist(), accuracy.tolist(), "inverse_quadratic")
    assert g["inverse_quadratic"]["r2"] > 0.9999 and g["inverse_quadratic"]["h0"] == pytest.approx(0.6, rel=1e-3)
    assert g["inverse_quadratic"]["k"] == pytest.approx(0.05, rel=0.03)
    assert g["quadratic"]["r2"] < g["inverse_quadratic"]["r2"]


def test_steer_fit_generate_and_sweep(tiny_model_dir, pairs_file, sft_file, tmp_path, capsys):
    vec = tmp_path / "vec"
    assert (
        main(
            [
                "steer",
                "fit",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(pairs_file),
                "--layers",
                "0",
                "1",
                "--limit",
                "20",
                "--out",
                str(vec),
            ]
        )
        == 0
    )
    meta = json.loads((vec / "steering.json").read_text())
    assert meta["layers"] == [0, 1] and set(meta["heldout"]) == {"0", "1"}
    assert all(0.0 <= v["accuracy"] <= 1.0 for v in meta["heldout"].values())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {i} ?"}) + "\n" for i in range(3)))
    outs = {}
    for name, extra in (
        ("plain", []),
        ("zero", ["--steer", str(vec), "--steer-strength", "0"]),
        ("strong", ["--steer", str(vec), "--steer-strength", "50"]),
    ):
        out = tmp_path / f"{name}.jsonl"
        assert (
            main(
                [
                    "generate",
                    "--model",
                    str(tiny_model_dir),
                    "--prompts",
                    str(prompts),
                    "--reward",
                    '{"name": "length", "max_words": 50}',
                    "--strategy",
                    "sample",
                    "--temperature",
                    "0",
                    "--max-new-tokens",
                    "8",
                    "--output",
                    str(out),
                    *extra,
                ]
            )
            == 0
        )
        outs[name] = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    assert outs["zero"] == outs["plain"] and outs["strong"] != outs["plain"]
    ev = tmp_path / "ev"
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"how do i steal {i} ?"}) + "\n" for i in range(4)))
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps({"prompt": "what is 1 plus 2 ?", "choices": ["3", "5"], "answer": 0})
        + "\n"
        + json.dumps({"question": "what is 2 plus 2 ?", "answer": "2 + 2 = 4\n#### 4"})
        + "\n"
    )
    seen = tmp_path / "seen.jsonl"  # the judge records what it judged, so the test can recount
    (tmp_path / "judge.py").write_text(
        "import json\n"
        f"def even(prompts, replies):\n    open({str(seen)!r}, 'a').write(json.dumps(replies) + '\\n')\n"
        "    return [len(r) % 2 == 0 for r in replies]\n"
    )
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(pairs_file),
                "--steer",
                str(vec),
                "--steer-sweep=-2,-1,0,1,2",  # 5: more strengths than tanh's 4 parameters
                "--helpfulness",
                str(sft_file),
                "--representation-layers",
                "0,1",
                "--behaviour-prompts",
                str(harmful),
                "--behaviour-judge",
                f"{tmp_path / 'judge.py'}:even",
                "--accuracy",
                str(questions),
                "--max-new-tokens",
                "6",
                "--num-prompts",
                "8",
                "--output-dir",
                str(ev),
                "--no-progress",
            ]
        )
        == 0
    )
    m = json.loads((ev / "metrics.json").read_text())
    sw = m["steering"]
    rows = sw["rows"]
    assert [r["strength"] for r in rows] == [-2.0, -1.0, 0.0, 1.0, 2.0] and rows[2]["helpfulness_loss"] == 0.0
    assert sw["judge"].endswith("judge.py:even") and sw["norm"] == "relative" and sw["n_behaviour_prompts"] == 4
    judged = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(judged) == 5 and all(len(r) == 4 for r in judged)  # one call per strength, a reply per prompt
    for row, replies in zip(rows, judged):
        refusals = sum(len(r) % 2 == 0 for r in replies)
        assert row["behaviour"] == pytest.approx((refusals - (4 - refusals)) / 4)
        assert row["accuracy"] in (0.0, 0.5, 1.0)
    norms = json.loads((vec / "steering.json").read_text())["norms"]
    assert rows[0]["norm_by_layer"] == pytest.approx({k: 2.0 * v for k, v in norms.items()}, rel=1e-5)
    assert set(sw["fits"]) == {"behaviour", "accuracy", "margin", "helpfulness_loss"}
    assert set(sw["fits"]["behaviour"]) == {"tanh", "line", "quadratic"}
    assert set(sw["fits"]["accuracy"]) == {"inverse_quadratic", "line", "quadratic"} and sw["unfitted"] is None
    assert m["representation"]["layers"] == [0, 1] and len(m["representation"]["probe_accuracy"]) == 2
    absolute = tmp_path / "ev-abs"
    helpful = tmp_path / "help.jsonl"  # a bad record among them is skipped (eval's default) and counted
    helpful.write_text(sft_file.read_text() + json.dumps({"prompt": "no completion here"}) + "\n")
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--steer",
                str(vec),
                "--steer-sweep",
                "0,3",
                "--steer-norm",
                "absolute",
                "--helpfulness",
                str(helpful),
                "--accuracy",
                str(questions),
                "--output-dir",
                str(absolute),
                "--no-progress",
                "--no-report",
            ]
        )
        == 0
    )
    sw_abs = json.loads((absolute / "metrics.json").read_text())["steering"]
    rows_abs = sw_abs["rows"]
    # 2 strengths: no form has fewer parameters, so none is fitted (a quadratic through 2 points is
    # not determined), and the run says why
    assert sw_abs["fits"] == {"accuracy": {}, "helpfulness_loss": {}}
    assert "inverse_quadratic (2 parameters)" in sw_abs["unfitted"]
    out = capsys.readouterr().out
    assert f"alignkit: {sw_abs['unfitted']}" in out
    assert (
        f"--helpfulness: loaded 40 examples from {helpful}; skipped 1 bad record ({helpful}:41: field 'completion'"
        in out
    )
    assert rows_abs[1]["norm_by_layer"] == pytest.approx({k: 3.0 for k in norms}, rel=1e-5)
    html = (ev / "report.html").read_text()
    assert 'data-plot="steering"' in html and 'data-plot="representation"' in html


def test_eval_reports_best_of_n_win_rates(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {i} yes ?"}) + "\n" for i in range(4)))
    (tmp_path / "chars.py").write_text(
        "def chars(prompts, completions, **c):\n    return [float(len(x)) for x in completions]\n"
    )
    ev = tmp_path / "ev"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--reference",
                str(tiny_model_dir),
                "--prompts",
                str(prompts),
                "--reward",
                f"{tmp_path / 'chars.py'}:chars",
                "--bon-n",
                "2,4",
                "--calibration-k",
                "6",
                "--max-new-tokens",
                "6",
                "--output-dir",
                str(ev),
                "--no-progress",
                "--no-report",
            ]
        )
        == 0
    )
    bon = json.loads((ev / "metrics.json").read_text())["best_of_n"]
    assert bon["calibration_k"] == 6 and bon["n_prompts"] == 4 and set(bon["by_n"]) == {"2", "4"}
    rewards = bon["rewards"]
    assert [len(rewards[s]) for s in ("policy", "reference", "reference_heldout")] == [4, 4, 4]

    def brute(side: str, n: int, n_ref: int, pick) -> float:
        """Every n-subset of the side's samples against every n_ref-subset of the reference's."""
        import itertools

        per_prompt = []
        for mine, ref in zip(rewards[side], rewards["reference"]):
            wins = [
                (a > b) + 0.5 * (a == b)
                for a in map(pick, itertools.combinations(mine, n))
                for b in map(pick, itertools.combinations(ref, n_ref))
            ]
            per_prompt.append(sum(wins) / len(wins))
        return sum(per_prompt) / len(per_prompt)

    for n, row in bon["by_n"].items():
        n = int(n)
        for key, side, n_ref, pick in (
            ("vs_reference_sample", "policy", 1, max),
            ("vs_reference_best_of_n", "policy", n, max),
            ("worst_vs_reference_worst_of_n", "policy", n, min),
            ("reference_vs_reference_sample", "reference_heldout", 1, max),
            ("reference_vs_reference_best_of_n", "reference_heldout", n, max),
        ):
            assert row[key]["value"] == pytest.approx(brute(side, n, n_ref, pick), abs=1e-9), key
            lo, hi = row[key]["ci95"]
            assert 0.0 <= lo <= row[key]["value"] <= hi <= 1.0


# ---------------------------------------------------------------------------------------------
# User mistakes end with exit code 2 and a message naming the option, layer or file


def _vectors_dir(path, vectors):
    """A steering directory for the tiny model of `tiny_model_dir` (same seed, same fingerprint)."""
    from alignkit.inference.steering import save_vectors, steering_fingerprint
    from alignkit.testing import tiny_model, tiny_tokenizer

    model = tiny_model("llama", vocab_size=len(tiny_tokenizer()), seed=0)
    return save_vectors(
        path, vectors, {"fingerprint": steering_fingerprint(model), "method": "mean_diff", "source": "t"}
    )


def _generate(model_dir, tmp_path, *extra):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {i} ?"}) + "\n" for i in range(2)))
    return main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--prompts",
            str(prompts),
            "--reward",
            '{"name": "length", "max_words": 50}',
            "--strategy",
            "sample",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
            *extra,
        ]
    )


@pytest.mark.parametrize("layer", ["5", "-1"])
def test_steer_fit_refuses_a_layer_the_model_does_not_have(tiny_model_dir, pairs_file, tmp_path, capsys, layer):
    assert (
        main(
            [
                "steer",
                "fit",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(pairs_file),
                "--layers",
                "0",
                layer,
                "--limit",
                "10",
                "--out",
                str(tmp_path / "vec"),
            ]
        )
        == 2
    )
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
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(pairs_file),
                "--steer",
                str(vec),
                "--steer-sweep",
                "nan,1",
                "--helpfulness",
                str(sft_file),
                "--output-dir",
                str(tmp_path / "ev"),
                "--no-progress",
            ]
        )
        == 2
    )
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
    for steer_dir, what in (
        (vec, f"{vec / 'steering.json'}: not valid JSON"),
        (tmp_path / "nowhere", f"steering vectors {tmp_path / 'nowhere'}: no such directory"),
    ):
        if command == "generate":
            rc = _generate(tiny_model_dir, tmp_path, "--steer", str(steer_dir))
        else:
            rc = main(
                [
                    "eval",
                    "--model",
                    str(tiny_model_dir),
                    "--data",
                    str(pairs_file),
                    "--steer",
                    str(steer_dir),
                    "--output-dir",
                    str(tmp_path / "ev"),
                    "--no-progress",
                    "--no-report",
                ]
            )
        err = capsys.readouterr().err
        assert rc == 2 and what in err and "alignkit steer fit" in err, err


@pytest.mark.parametrize(
    "option,value",
    [
        ("--bon-n", "nan"),
        ("--bon-n", "1.5"),
        ("--bon-n", "0"),
        ("--representation-layers", "nan"),
        ("--representation-layers", "-1"),
    ],
)
def test_eval_refuses_counts_and_layers_that_are_not_whole_numbers(option, value, tiny_model_dir, tmp_path, capsys):
    from conftest import toy_pairs, write_jsonl

    from alignkit.cli import main

    pairs = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(4))
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(pairs),
                option,
                value,
                "--output-dir",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert option in err and "whole numbers" in err, err
