"""The HTML run report: content from fixtures written like a real run, and rendering in Chromium."""

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from alignkit.errors import AlignkitError
from alignkit.report import LOOKED_FOR, build_report

ALL_PLOTS = ("training", "preference", "reward_kl", "length_bias", "win_rate", "overoptimisation", "strategy", "health")
CHROMIUM = Path("/usr/bin/chromium")


def write_metrics(run_dir: Path, n_train: int = 20, eval_every: int = 5) -> None:
    rows = []
    for step in range(1, n_train + 1):
        margin = 0.08 * step
        rows.append(
            {
                "step": step,
                "split": "train",
                "loss": math.log(2) - 0.02 * step,
                "lr": 5e-6 * min(1, step / 4),
                "grad_norm": 2.0 / step**0.5,
                "tokens_per_s": 1500.0 + step,
                "rewards/chosen": 0.02 * step,
                "rewards/rejected": 0.02 * step - margin,
                "rewards/margins": margin,
                "rewards/accuracies": min(1.0, 0.5 + 0.02 * step),
                "logps/chosen": -40.0 + 0.1 * step,
                "logps/rejected": -45.0 - 0.3 * step,
                "loss/dpo": math.log(2) - 0.02 * step,
                "loss/sft": 1.2 - 0.01 * step,
            }
        )
        if step % eval_every == 0:
            rows.append(
                {
                    "step": step,
                    "split": "eval",
                    "loss": math.log(2) - 0.015 * step,
                    "rewards/margins": 0.06 * step,
                    "rewards/accuracies": 0.5 + 0.015 * step,
                    "rewards/chosen": 0.01 * step,
                    "rewards/rejected": -0.05 * step,
                }
            )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def acc(value, half=0.03, n=400):
    return {"value": value, "ci95": [value - half, value + half], "n": n}


def eval_metrics() -> dict:
    rng = np.random.default_rng(0)
    diffs = rng.integers(-60, 60, size=300)
    points = [{"length_diff": int(d), "margin": float(0.01 * d + rng.normal(0, 0.5))} for d in diffs]
    return {
        "alignkit_eval": 1,
        "model": "runs/dpo/final",
        "reference": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "data": "data/heldout.jsonl",
        "n_pairs": 400,
        "date": "2026-11-23",
        "preference": {
            "ranking_accuracy": acc(0.612),
            "ranking_accuracy_mean_logprob": acc(0.58),
            "idealized_ranking_accuracy": {"value": 0.94, "n": 400, "beta": 0.1},
            "implicit_reward_accuracy": acc(0.71),
            "implicit_margin": acc(0.84, 0.1),
            "reward_accuracy": None,
        },
        "length_bias": {
            "reward": "implicit",
            "corr_reward_length": 0.11,
            "corr_margin_length_diff": 0.23,
            "accuracy_chosen_longer": acc(0.78, n=150),
            "accuracy_chosen_shorter": acc(0.55, n=140),
            "accuracy_equal_length": acc(0.6, 0.2, n=10),
            "points": points,
        },
        "generation": {
            "n_prompts": 200,
            "scorer": "reward_model:OpenAssistant/reward-model-deberta-v3-large-v2",
            "win_rate": {"value": 0.635, "ci95": [0.571, 0.694], "n": 200, "wins": 120, "ties": 14, "losses": 66},
            "length_controlled_win_rate": {"value": 0.552, "ci95": [0.49, 0.61], "raw": 0.635, "n": 200},
            "policy_length_mean": 61.5,
            "reference_length_mean": 44.0,
            "kl": {"value": 3.214, "ci95": [2.9, 3.52], "n": 200},
            "policy_reward_mean": 1.42,
            "reference_reward_mean": 0.88,
        },
        "checkpoints": [
            {
                "step": s,
                "kl": kl,
                "reward": r,
                "win_rate": acc(w, 0.07, 200),
                "topk_entropy": e,
                "topk_mass": m,
                "chosen_logp_change": d,
                "chosen_logp_down_fraction": f,
            }
            for s, kl, r, w, e, m, d, f in [
                (5, 0.4, 0.95, 0.52, 2.1, 0.93, 0.3, 0.3),
                (10, 1.1, 1.18, 0.57, 1.9, 0.91, 0.1, 0.42),
                (15, 2.2, 1.35, 0.61, 1.6, 0.88, -0.4, 0.55),
                (20, 3.2, 1.42, 0.635, 1.2, 0.84, -1.1, 0.68),
            ]
        ],
        "strategy": {
            "strategy": "deal",
            "n_prompts": 24,
            "reward": {"value": 3.323, "ci95": [3.037, 3.611], "n": 24},
            "sampling_reward": {"value": 2.318, "ci95": [1.996, 2.647], "n": 24},
            "win_rate_vs_sampling": {"value": 0.875, "ci95": [0.75, 1.0], "n": 24, "wins": 21, "ties": 0, "losses": 3},
            "kl": {"value": 5.55, "kind": "bound"},
            "cost": {
                "seconds": 256.8,
                "new_tokens": 10248,
                "prompt_tokens": 18048,
                "seconds_vs_sampling": 10.7,
                "new_tokens_vs_sampling": 9.5,
            },
        },
    }


def full_run(root: Path) -> Path:
    run = root / "run"
    (run / "eval").mkdir(parents=True)
    write_metrics(run)
    with (run / "metrics.jsonl").open("a") as f:  # health monitor alerts (alignkit/train/health.py)
        for step, rule in ((8, "grad_norm_spike"), (15, "likelihood_displacement"), (18, "grad_norm_spike")):
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "split": "alert",
                        "rule": rule,
                        "seen_in": "train",
                        "level": "warn",
                        "message": f"{rule} seen",
                        "evidence": {"ratio": 12.5},
                        "advice": "look",
                    }
                )
                + "\n"
            )
    config = {
        "recipe": "dpo",
        "output_dir": str(run),
        "seed": 0,
        "reference": "cached",
        "loss": {"name": "dpo", "beta": 0.1},
        "losses": [],
        "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": "auto"},
        "lora": {"enabled": False, "r": 16, "alpha": 32},
        "data": {"train": "data/train.jsonl", "eval": None},
        "train": {
            "learning_rate": 5e-6,
            "batch_size": 8,
            "grad_accum": 4,
            "epochs": 1.0,
            "max_steps": 20,
            "warmup_ratio": 0.1,
            "lr_schedule": "cosine",
            "precision": "auto",
            "max_grad_norm": 1.0,
        },
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    summary = {"steps": 20, "train": {"loss": math.log(2) - 0.4}, "eval": {"loss": 0.39, "rewards/accuracies": 0.8}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "eval" / "metrics.json").write_text(json.dumps(eval_metrics()))
    return run


def figures(html: str) -> dict:
    """data-plot name -> the figure's markup."""
    return {
        m.group(1): m.group(0)
        for m in re.finditer(r'<figure class="plot" data-plot="([a-z_]+)".*?</figure>', html, re.S)
    }


def network_loads(html: str) -> list:
    """Attributes or CSS that would fetch from a network: src=/href= to http(s) or //host, url(http...)."""
    attr = re.findall(r'\b(?:src|href|xlink:href|action|poster|data)\s*=\s*["\']?\s*(?:https?:)?//', html, re.I)
    css = re.findall(r'(?:url\(\s*["\']?\s*(?:https?:)?//|@import)', html, re.I)
    return attr + css


def test_full_report_has_every_plot_and_key_number(tmp_path):
    run = full_run(tmp_path)
    out = build_report(run)
    assert out == run / "report.html"
    html = out.read_text()
    figs = figures(html)
    assert set(figs) == set(ALL_PLOTS)
    for name, fig in figs.items():
        svg = re.search(r"<svg\b.*?</svg>", fig, re.S)
        assert svg, name
        assert len(re.findall(r"<(?:path|use)\b", svg.group(0))) > 20, f"{name}: nearly nothing drawn"
        assert re.search(r"<figcaption>.+</figcaption>", fig), name
    assert network_loads(html) == []
    assert "<?xml" not in html and "<!DOCTYPE svg" not in html
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), "inline SVGs must not share ids"
    for expected in (
        "63.5% (95% CI 57.1–69.4%, n=200)",
        "120 wins, 14 ties, 66 losses",  # win rate
        "55.2% (95% CI 49.0–61.0%, n=200)",  # length-controlled win rate
        "mean tokens 61.5 against 44",
        "61.2% (95% CI 58.2–64.2%, n=400)",
        "idealized: 94.0%, β = 0.1",  # ranking accuracy
        "3.214 (95% CI 2.9 to 3.52, n=200)",  # KL
        "r(margin, length difference) = +0.23",
        "r(reward, length) = +0.11",
        "0.2931",  # final train loss: log 2 - 0.4
        "80.0%",  # final eval accuracy, last eval row
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "dpo (beta=0.1)",
        "5e-06",
        "Inference-time strategy: deal",
        "10.7x sampling",
        "87.5% (95% CI 75.0–100.0%, n=24)",
    ):
        assert expected in html, expected
    assert 'data-missing="' not in html  # nothing absent
    assert not list(run.glob(".report.html.*")), "temporary file left behind"


def test_metrics_only_gives_training_plots_and_notes(tmp_path):
    write_metrics(tmp_path)
    html = build_report(tmp_path, output=tmp_path / "out" / "r.html").read_text()
    assert set(figures(html)) == {"training", "preference"}
    for name in ("config", "eval"):
        assert f'data-missing="{name}"' in html
    assert "run <code>alignkit eval</code>" in html
    assert "final train loss" in html


def test_eval_dir_alone(tmp_path):
    ev = eval_metrics()
    del ev["checkpoints"], ev["generation"]["win_rate"]
    (tmp_path / "metrics.json").write_text(json.dumps(ev))
    html = build_report(tmp_path).read_text()
    assert set(figures(html)) == {"length_bias", "strategy"}
    for name in ("training", "preference", "win_rate", "reward_kl", "overoptimisation"):
        assert f'data-missing="{name}"' in html, name
    del ev["strategy"]  # an eval without a strategy gets no strategy plot and no placeholder for one
    (tmp_path / "metrics.json").write_text(json.dumps(ev))
    html = build_report(tmp_path).read_text()
    assert "strategy" not in figures(html) and 'data-missing="strategy"' not in html
    assert "generation win rates" in html


def test_empty_dir_names_the_files_looked_for(tmp_path):
    with pytest.raises(AlignkitError) as e:
        build_report(tmp_path)
    for name in LOOKED_FOR:
        assert name in str(e.value)
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(AlignkitError, match="does not exist"):
        build_report(tmp_path / "nope")


def test_nan_none_single_points_and_bad_lines(tmp_path):
    rows = [
        {"step": 1, "split": "train", "loss": float("nan"), "lr": 1e-5, "grad_norm": None},
        {"step": 2, "split": "train", "loss": 0.5, "lr": 1e-5, "grad_norm": float("inf")},
        {"step": 2, "split": "eval", "accuracy": 0.7},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "split": "tr'  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    ev = {
        "alignkit_eval": 1,
        "length_bias": {
            "corr_margin_length_diff": None,
            "points": [{"length_diff": 3, "margin": float("nan")}, {"length_diff": 1, "margin": 0.2}],
        },
        "generation": {"win_rate": {"value": 0.5, "ci95": None, "n": 1}, "kl": None},
        "checkpoints": [{"step": 4, "kl": 0.1, "reward": None, "topk_entropy": float("nan")}],
    }
    (tmp_path / "metrics.json").write_text(json.dumps(ev))
    html = build_report(tmp_path).read_text()
    figs = figures(html)
    # NaN steps are marked (a rug of crosses), so an all-NaN indicator still gets its panel.
    assert set(figs) == {"training", "preference", "length_bias", "win_rate", "overoptimisation"}
    assert 'data-missing="reward_kl"' in html  # its one checkpoint has no reward
    assert "line 4 is incomplete" in html  # the truncated last line is dropped, visibly
    assert '<td class="v">0.5<' in html  # final train loss: the last finite one
    assert '<td class="v">50.0% (n=1)<' in html  # win rate without an interval


def test_bad_input_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\nnot json\n{"step": 2}\n')
    with pytest.raises(AlignkitError, match=r"metrics\.jsonl:2"):
        build_report(tmp_path)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "summary.json").write_text("{\n  oops\n}")
    with pytest.raises(AlignkitError, match=r"summary\.json:2"):
        build_report(tmp_path)


def chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed: apt-get install chromium")
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_plots_render_in_chromium(tmp_path):
    run = full_run(tmp_path)
    report = build_report(run)
    window = "--window-size=1280,6000"
    dom = chromium(
        f"--user-data-dir={tmp_path / 'profile1'}", window, "--virtual-time-budget=3000", "--dump-dom", report.as_uri()
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    figs = figures(dom.stdout)
    assert set(figs) == set(ALL_PLOTS)
    boxes = {}
    for name, fig in figs.items():
        attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', fig.split(">", 1)[0]))
        assert attrs.get("rendered") == "ok", (name, attrs)
        for key in ("rendered-width", "rendered-height", "content-width", "content-height", "drawn-elements"):
            assert int(attrs[key]) > 0, (name, key, attrs)
        boxes[name] = tuple(int(attrs[f"rendered-{k}"]) for k in ("left", "top", "width", "height"))
    assert re.search(r'data-plots-rendered="8/8"', dom.stdout)

    shot = tmp_path / "report.png"
    res = chromium(f"--user-data-dir={tmp_path / 'profile2'}", window, f"--screenshot={shot}", report.as_uri())
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    from matplotlib.image import imread

    img = imread(shot)[..., :3]  # [H, W, 3] floats in [0, 1]
    for name, (left, top, width, height) in boxes.items():
        assert top + height <= img.shape[0], f"{name} below the screenshot; enlarge the window"
        region = img[top : top + height, left : left + width]
        ink = (region.min(axis=-1) < 0.75).mean()  # share of pixels clearly darker than the white page
        assert ink > 0.01, f"{name}: plot region is blank as rendered ({ink:.4f} ink)"
