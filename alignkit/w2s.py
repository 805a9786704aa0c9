"""`alignkit w2s`: the weak-to-strong protocol of Burns et al. ("Weak-to-Strong Generalization:
Eliciting Strong Capabilities With Weak Supervision", arXiv 2312.09390) on preference pairs.

The task is binary: of a pair's two replies, shown in random order, is the first the better one?
(A yes/no labelled prompt, `{"prompt": ..., "label": true}`, is the pair of replies "Yes" and "No".)
Each model is a reward model (`recipe: reward`) and answers with sigmoid(r(first) - r(second)).
Every stage lives in the run directory and is skipped when it is done (a training stage that was
cut off resumes from its last checkpoint), so the command can be run again after any failure:

    data/         the pairs split (seeded) into weak_train / transfer / test, replies in random order,
                  each record's `prob` 1 or 0 (ground truth); weak_labels.jsonl: transfer with `prob`
                  = the weak model's probability (soft labels)
    weak/         the weak model trained on weak_train, ground truth
    ceiling/      the strong model trained on transfer, ground truth (the strong ceiling)
    student/      the strong model trained on transfer's weak labels (soft_bradley_terry)
    student_conf/ the same with the auxiliary confidence loss (w2s_confidence: alpha warmed up over
                  the first `warmup` of training, as in the paper)
    summary.json  accuracy of each on test (Wilson intervals), PGR of both students (bootstrap
                  interval over test pairs), the deception splits (`alignkit.eval.weak_to_strong`)

Weak and strong models may differ in size and tokenizer (each reads the text with its own). Training
settings shared by the stages come from `--config` and `--set`, and per side from `--weak-set` /
`--strong-set` (LoRA: lora.enabled=true; head only: model.freeze_layers=<all blocks>). Under
torchrun the training stages run on every process; scoring runs on each (no collectives) and
every process writes the same files atomically, so they never read a torn one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignkit import jsonfile
from alignkit.data.examples import PreferenceExample
from alignkit.errors import ConfigError, DataError

STAGES = ("weak", "ceiling", "student", "student_conf")
FIXED = ("recipe", "data.train", "data.eval", "data.eval_fraction", "model.name_or_path", "output_dir", "loss.name")


@dataclass
class W2SConfig:
    weak: str  # model directory or hub id
    strong: str
    data: str  # preference pairs, any format `alignkit train` reads
    output_dir: str
    split: tuple = (0.4, 0.4, 0.2)  # weak_train, transfer, test
    config: str | None = None  # a YAML training config the stages share
    overrides: list = field(default_factory=list)  # key=value for every stage
    weak_overrides: list = field(default_factory=list)
    strong_overrides: list = field(default_factory=list)
    alpha: float = 0.75  # w2s_confidence's alpha (the paper: 0.75 for its largest students)
    warmup: float = 0.2  # share of training over which alpha warms up linearly from 0
    limit: int | None = None  # use at most this many pairs
    seed: int = 0
    batch_size: int = 16  # scoring
    progress: bool = True

    def __post_init__(self):
        if len(self.split) != 3 or any(f <= 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise ConfigError(
                f"--split: three positive shares summing to 1 (weak_train, transfer, test); got {self.split}"
            )
        for key in (
            o.split("=", 1)[0].strip() for o in [*self.overrides, *self.weak_overrides, *self.strong_overrides]
        ):
            if key in FIXED:
                raise ConfigError(f"--set {key}: w2s sets it for each stage; give the models with --weak/--strong")
        if not 0 <= self.alpha <= 1 or not 0 <= self.warmup <= 1:
            raise ConfigError(f"--alpha and --warmup must be in [0, 1]; got {self.alpha}, {self.warmup}")


def _record(e, first_is_chosen: bool, prob: float) -> dict:
    a, b = (e.chosen, e.rejected) if first_is_chosen else (e.rejected, e.chosen)
    return {"prompt": list(e.prompt), "chosen": list(a), "rejected": list(b), "prob": prob}


YES, NO = ({"role": "assistant", "content": "Yes"},), ({"role": "assistant", "content": "No"},)


def _yes_no(e) -> PreferenceExample:
    """A yes/no labelled prompt as a pair: the better reply to the prompt is "Yes" when the label is
    true, "No" when it is false (so a reward model answers a yes/no question)."""
    label = e.columns.get("label")
    if isinstance(label, (int, float)) and not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        raise DataError(
            f"{e.source}: `label` must be true/false (or 1/0): is the answer to the prompt yes? got {label!r}"
        )
    return PreferenceExample(e.prompt, YES if label else NO, NO if label else YES, e.source)


def load_task(path: str):
    """(examples with prompt / chosen / rejected / source, skipped count): preference pairs, or
    prompt records with a yes/no `label` ({"prompt": ..., "label": true})."""
    from alignkit.data.prompts import first_record

    first = first_record(path)
    if isinstance(first, dict) and "label" in first and "chosen" not in first:
        from alignkit.data.prompts import load_prompt_examples

        result = load_prompt_examples(path, on_bad_record="skip")
        return [_yes_no(e) for e in result.examples], len(result.skipped)
    from alignkit.data.formats import load_preference_examples

    result = load_preference_examples(path, on_bad_record="skip")
    return result.examples, len(result.skipped)


def split_data(cfg: W2SConfig) -> dict:
    """OUT/data/{weak_train,transfer,test}.jsonl and sources.json (which input pair each line is)."""
    data = Path(cfg.output_dir) / "data"
    if (data / "sources.json").is_file():
        return json.loads((data / "sources.json").read_text())
    examples, skipped = load_task(cfg.data)
    examples = examples[: cfg.limit] if cfg.limit else examples
    rng = random.Random(cfg.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    first = [rng.random() < 0.5 for _ in order]  # the chosen reply comes first in about half the pairs
    cut1 = int(round(cfg.split[0] * len(order)))
    cut2 = cut1 + int(round(cfg.split[1] * len(order)))
    parts = {"weak_train": order[:cut1], "transfer": order[cut1:cut2], "test": order[cut2:]}
    small = [k for k, v in parts.items() if len(v) < 2]
    if small:
        raise DataError(
            f"{cfg.data}: {len(examples)} usable pairs leave too few for {small}: give more pairs or --split"
        )
    sources = {}
    for name, idx in parts.items():
        rows = [_record(examples[i], first[i], 1.0 if first[i] else 0.0) for i in idx]
        jsonfile.write_lines_atomic(data / f"{name}.jsonl", rows)
        sources[name] = [examples[i].source for i in idx]
    sources["skipped"] = skipped
    jsonfile.write_atomic(data / "sources.json", sources)  # written last: the split is done
    return sources


def _train_stage(cfg: W2SConfig, stage: str, model: str, data_file: Path, loss: list, side: list) -> Path:
    """One `recipe: reward` run in OUT/<stage> (resumed when cut off; returned at once when done)."""
    import alignkit.api
    from alignkit.config import load_config

    out = Path(cfg.output_dir) / stage
    overrides = [
        *cfg.overrides,
        *side,
        "recipe=reward",
        f"model.name_or_path={model}",
        f"data.train={data_file}",
        "data.eval_fraction=0",  # every pair of the split trains; the test split measures
        f"output_dir={out}",
        *loss,
    ]
    run = load_config(cfg.config, overrides)
    if run.data.eval:
        raise ConfigError(f"{cfg.config}: w2s evaluates on its own test split: drop data.eval")
    alignkit.api.train(run, resume=True, progress=cfg.progress)
    return out / "final"


def score_pairs(model_dir: Path, rows: list, batch_size: int) -> np.ndarray:
    """r(first) - r(second) of each record, from a reward model directory."""
    from alignkit.rewards.model import RewardModel

    rm = RewardModel(model_dir, batch_size=batch_size)
    prompts = [r["prompt"] for r in rows]
    text = lambda msgs: "\n".join(m["content"] for m in msgs)  # noqa: E731
    first = rm(prompts, [text(r["chosen"]) for r in rows])
    second = rm(prompts, [text(r["rejected"]) for r in rows])
    return np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)


def _rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _scores(cfg: W2SConfig, stage: str, final: Path, name: str, rows: list) -> np.ndarray:
    """Scores of `rows` (the `name` split) by a stage's model, cached in OUT/scores/."""
    path = Path(cfg.output_dir) / "scores" / f"{stage}_{name}.json"
    if path.is_file():
        return np.asarray(json.loads(path.read_text()))
    z = score_pairs(final, rows, cfg.batch_size)
    jsonfile.write_atomic(path, z.tolist(), indent=None)
    return z


def weak_labels(cfg: W2SConfig, weak_final: Path) -> tuple[Path, dict]:
    """transfer with `prob` = sigmoid(weak score): OUT/data/weak_labels.jsonl, and the labels' quality."""
    data = Path(cfg.output_dir) / "data"
    rows = _rows(data / "transfer.jsonl")
    z = _scores(cfg, "weak", weak_final, "transfer", rows)
    probs = 1 / (1 + np.exp(-z))
    truth = np.array([r["prob"] for r in rows]) > 0.5
    path = data / "weak_labels.jsonl"
    if not path.is_file():
        jsonfile.write_lines_atomic(path, [{**r, "prob": float(p)} for r, p in zip(rows, probs)])
    return path, {
        "accuracy": float(((z > 0) == truth).mean()),
        "mean_confidence": float(np.abs(probs - 0.5).mean() + 0.5),
    }


def run_w2s(cfg: W2SConfig) -> dict:
    """Every stage (skipping those done) and OUT/summary.json."""
    from alignkit.eval import weak_to_strong as W

    sources = split_data(cfg)
    data = Path(cfg.output_dir) / "data"
    weak_final = _train_stage(
        cfg, "weak", cfg.weak, data / "weak_train.jsonl", ["loss.name=soft_bradley_terry"], cfg.weak_overrides
    )
    labels_file, label_quality = weak_labels(cfg, weak_final)
    finals = {"weak": weak_final}
    plans = {
        "ceiling": (data / "transfer.jsonl", ["loss.name=soft_bradley_terry"]),
        "student": (labels_file, ["loss.name=soft_bradley_terry"]),
        "student_conf": (
            labels_file,
            ["loss.name=w2s_confidence", f"loss.alpha={cfg.alpha}", f"loss.warmup={cfg.warmup}"],
        ),
    }
    for stage, (path, loss) in plans.items():
        finals[stage] = _train_stage(cfg, stage, cfg.strong, path, loss, cfg.strong_overrides)
    test = _rows(data / "test.jsonl")
    truth = np.array([r["prob"] for r in test]) > 0.5
    correct = {s: (_scores(cfg, s, finals[s], "test", test) > 0) == truth for s in STAGES}
    summary = {
        "weak": cfg.weak,
        "strong": cfg.strong,
        "data": cfg.data,
        "pairs": {k: len(v) for k, v in sources.items() if k != "skipped"},
        "skipped_records": sources["skipped"],
        "weak_labels": label_quality,
        "accuracy": {s: W.accuracy(correct[s]) for s in STAGES},
        "pgr": {
            s: W.pgr(correct["weak"], correct[s], correct["ceiling"], seed=cfg.seed)
            for s in ("student", "student_conf")
        },
        "deception": {
            s: W.deception(correct["weak"], correct[s], correct["ceiling"]) for s in ("student", "student_conf")
        },
        "confidence_loss": {"alpha": cfg.alpha, "warmup": cfg.warmup},
    }
    jsonfile.write_atomic(Path(cfg.output_dir) / "summary.json", summary)
    return summary


def summary_lines(s: dict) -> list:
    """The summary as lines a person reads."""

    def acc(d):
        return "n/a" if d["value"] is None else f"{d['value']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}] (n={d['n']})"

    def pgr(d):
        return (
            "undefined (ceiling not above weak)"
            if d["value"] is None
            else f"{d['value']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]"
        )

    lines = [f"weak labels on transfer: accuracy {s['weak_labels']['accuracy']:.3f}"]
    lines += [f"{stage} accuracy: {acc(s['accuracy'][stage])}" for stage in STAGES]
    for stage in ("student", "student_conf"):
        d = s["deception"][stage]
        lines.append(
            f"{stage}: PGR {pgr(s['pgr'][stage])}; accuracy where weak right {acc(d['accuracy_where_weak_right'])}, "
            f"where weak wrong {acc(d['accuracy_where_weak_wrong'])}"
        )
    return lines
