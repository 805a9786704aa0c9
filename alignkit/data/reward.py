"""Preference records for reward models: pairs, optionally with a margin and per-objective labels.

    {"prompt": "...", "chosen": "...", "rejected": "..."}                       # one reward
    {"prompt": ..., "chosen": ..., "rejected": ..., "margin": 2.0}             # reward.use_margin
    {"prompt": ..., "chosen": ..., "rejected": ...,
     "labels": {"helpful": 1, "harmless": -1, "concise": 0}}                   # reward.objectives
    {"prompt": ..., "chosen": ..., "rejected": ..., "prob": 0.8}               # a soft label

Any pair form of `formats` works. With several objectives, `labels` says per objective whether the
first completion (`chosen`) is better (1 or true), worse (-1 or false), or not judged (0 or null,
or the objective missing); directional preference alignment trains one reward per objective
(arXiv 2402.18571). `prob` (one objective only) is the probability that the first completion is
the better one: a soft label, such as a weak supervisor's (`alignkit w2s`), which the losses that
read it (`soft_bradley_terry`, `w2s_confidence`) fit; its sign gives the pair's label.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

from alignkit.data.examples import PreferenceExample
from alignkit.data.formats import LoadResult, Record, check_columns, load_records, parse_preference_record

REWARD_FIELDS = ("prompt", "chosen", "rejected", "margin", "labels", "prob")


@dataclass(frozen=True)
class RewardExample:
    pair: PreferenceExample
    labels: tuple  # per objective: +1 chosen better, -1 rejected better, 0 not judged
    margin: float = 0.0
    prob: float | None = None  # P(chosen is better): a soft label (None: the labels say it)

    @property
    def source(self) -> str:
        return self.pair.source


def _label(rec: Record, name: str, v) -> int:
    if v is None:
        return 0
    if isinstance(v, bool):  # before int: True == 1 in Python
        return 1 if v else -1
    if isinstance(v, (int, float)) and v in (1, -1, 0):
        return int(v)
    raise rec.error(
        f"label {name!r} in {rec.label('labels')} must be 1 (chosen better), -1 (rejected "
        f"better) or 0/null (not judged), found {v!r}"
    )


def _labels(rec: Record, objectives: tuple) -> tuple:
    if len(objectives) == 1 and not rec.has("labels"):
        return (1,)
    value = rec.get("labels")
    if not isinstance(value, Mapping):
        raise rec.error(f"{rec.label('labels')} must map each objective to 1, -1 or 0, found {value!r}")
    unknown = sorted(set(value) - set(objectives))
    if unknown:
        raise rec.error(
            f"{rec.label('labels')} names {unknown}, which are not in reward.objectives "
            f"{list(objectives)}; add them there or drop them from the data"
        )
    out = []
    for name in objectives:
        out.append(_label(rec, name, value.get(name)))
    if not any(out):
        raise rec.error(f"{rec.label('labels')} judges no objective (all 0 or missing), so the pair teaches nothing")
    return tuple(out)


def parse_reward_record(
    record: object,
    location: str,
    columns: dict | None = None,
    *,
    objectives: tuple = ("reward",),
    use_margin: bool = False,
) -> RewardExample:
    """Validate one reward-model record: a pair, its per-objective labels and (optionally) margin."""
    columns = check_columns(columns, REWARD_FIELDS, "reward")
    pair = parse_preference_record(
        record, location, {k: v for k, v in columns.items() if k in ("prompt", "chosen", "rejected")}
    )
    rec = Record(record, location, columns, REWARD_FIELDS)
    margin = 0.0
    if use_margin:
        m = rec.get("margin")
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
            raise rec.error(
                f"{rec.label('margin')} must be a finite number >= 0 (how much better chosen is), found {m!r}"
            )
        margin = float(m)
    if rec.has("prob"):
        return _soft(rec, pair, tuple(objectives), margin)
    return RewardExample(pair, _labels(rec, tuple(objectives)), margin)


def _soft(rec: Record, pair, objectives: tuple, margin: float) -> RewardExample:
    p = rec.get("prob")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise rec.error(f"{rec.label('prob')} must be a probability in [0, 1] (that chosen is better), found {p!r}")
    if len(objectives) > 1 or rec.has("labels"):
        raise rec.error(f"{rec.label('prob')} is a soft label of one reward: drop `labels` and keep one objective")
    return RewardExample(pair, (1 if p > 0.5 else -1 if p < 0.5 else 0,), margin, float(p))


def load_reward_examples(
    path: str,
    *,
    columns=None,
    on_bad_record: str = "error",
    split: str | None = None,
    objectives: tuple = ("reward",),
    use_margin: bool = False,
) -> LoadResult:
    columns = check_columns(columns, REWARD_FIELDS, "reward")
    parse = functools.partial(parse_reward_record, objectives=tuple(objectives), use_margin=use_margin)
    return load_records(path, parse, columns, on_bad_record, split)
