"""`alignkit demo`'s report shows the demo's own before/after measurement.

Before: the report in runs/demo/run said "No eval results" although the demo had just measured
held-out instruction following before and after training. The real model is replaced by canned
replies here; everything from the judge to the HTML is the demo's own code.
"""

import json

import yaml

from alignkit import demo, demo_task
from alignkit.eval.stats import paired_bootstrap
from alignkit.report import build_report
from alignkit.report.inputs import read_run

BASE = "It is a lovely thing to think about."  # a finished, fluent reply that follows no instruction


class _Result:
    def __init__(self, run_dir, steps):
        self.run_dir, self.final_dir, self.steps = run_dir, run_dir / "final", steps


def _fake_train(cfg, progress=True):
    """What `alignkit.train.loop.train` leaves behind: metrics, config and the run's report."""
    from pathlib import Path

    run = Path(cfg.output_dir)
    run.mkdir(parents=True)
    rows = [{"step": s, "split": "train", "loss": 0.7 - 0.02 * s} for s in range(1, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text(yaml.safe_dump({"recipe": cfg.recipe, "seed": cfg.seed}))
    build_report(run)
    return _Result(run, 4)


def _after(item):  # every third held-out reply follows its instruction after "training"
    return demo_task.satisfy(item, BASE)


def test_demo_report_shows_the_before_after_table(tmp_path, monkeypatch):
    n = 24
    heldout = demo_task.heldout_prompts(n)
    after = [_after(i) if k % 3 == 0 else BASE for k, i in enumerate(heldout)]
    before = [_after(i) if k == 1 else BASE for k, i in enumerate(heldout)]  # one passes before, fails after

    def fake_replies(model, tok, prompts, progress, desc):
        if desc == "held-out (before)":
            return before
        if desc == "held-out (after)":
            return after
        return [BASE] * len(prompts)

    for name, value in (
        ("N_TRAIN", 8),
        ("N_HELDOUT", n),
        ("N_PLAIN", 4),
        ("_replies", fake_replies),
        ("train", _fake_train),
        ("default_model_dir", lambda: tmp_path / "model"),
        ("load_tokenizer", lambda mc: None),
        ("load_model", lambda mc, **kw: None),
    ):
        monkeypatch.setattr(demo, name, value)
    out = tmp_path / "demo"
    results = demo.run_demo(output_dir=str(out), progress=False)

    html = (out / "run" / "report.html").read_text()
    assert "No eval results" not in html
    # Each constraint and the whole set: before, after, the change with its 95% interval, n.
    for c in (*demo_task.CONSTRAINTS, None):
        idx = [k for k, i in enumerate(heldout) if c is None or i.constraint == c]
        b = [float(demo_task.judge(heldout[k], before[k])) for k in idx]
        a = [float(demo_task.judge(heldout[k], after[k])) for k in idx]
        ci = paired_bootstrap(b, a, seed=0)
        assert ci.diff != 0
        row = (
            f"<td>{ci.before:.3f}</td><td>{ci.after:.3f}</td><td>{ci.diff:+.3f}</td>"
            f"<td>[{ci.lo:+.3f}, {ci.hi:+.3f}]</td><td>{ci.n}</td>"
        )
        assert row in html, (c, row)
    assert f"{results['before']:.3f} → {results['after']:.3f}" in html  # a key number too
    assert "reply mentions its topic" in html

    # The demo writes exactly what the report reads, and results.json carries the same section.
    section = json.loads((out / "results.json").read_text())["before_after"]
    assert read_run(out / "run").before_after == section
    overall = [r for r in section["rows"] if r.get("overall")]
    assert len(overall) == 1 and overall[0]["before"] == results["before"] and overall[0]["ci95"] == results["ci95"]


def test_a_malformed_before_after_file_is_named(tmp_path):
    import pytest

    from alignkit.errors import AlignkitError
    from alignkit.report.inputs import write_before_after

    row = {"label": "all", "before": 0.2, "after": 0.4, "diff": 0.2, "ci95": [0.1, 0.3], "n": 10, "overall": True}
    with pytest.raises(AlignkitError, match=r"before_after\.json: rows\[0\]\.after must be a finite number"):
        write_before_after(tmp_path, {"alignkit_before_after": 1, "rows": [dict(row, after=float("nan"))]})
    (tmp_path / "before_after.json").write_text(json.dumps({"alignkit_before_after": 1, "rows": []}))
    with pytest.raises(AlignkitError, match=r"before_after\.json: `rows` must be a non-empty list"):
        build_report(tmp_path)
    write_before_after(tmp_path, {"alignkit_before_after": 1, "title": "T", "rows": [row]})
    html = build_report(tmp_path).read_text()  # a before/after section alone makes a report
    assert "<td>0.200</td><td>0.400</td><td>+0.200</td><td>[+0.100, +0.300]</td><td>10</td>" in html
