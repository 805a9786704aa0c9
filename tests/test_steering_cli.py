"""Steering end to end on a tiny model (issue 20): `alignkit steer fit` saves vectors with their
held-out separation, `generate --steer` at strength 0 is unsteered generation, and `eval
--steer-sweep` / `--representation-layers` measure, fit and plot."""

import json

import pytest

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
