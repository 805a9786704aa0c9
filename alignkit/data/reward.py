"""Preference records for reward models: pairs, optionally with a margin and per-objective labels.

    {"prompt": "...", "chosen": "...", "rejected": "..."}                       # one reward
    {"prompt": ..., "chosen": ..., "rejected": ..., "margin": 2.0}             # reward.use_margin
    {"prompt": ..., "chosen": ..., "rejected": ...,
     "labels": {"helpful": 1, "harmless": -1, "concise": 0}}                   # reward.objectives

Any pair form of `formats` works. With several objectives, `labels` says per objective whether the
first completion (`chosen`) is better (1 or true), worse (-1 or false), or not judged (0 or null,
or the objective missing); directional preference alignment trains one reward per objective
(arXiv 2402.18571).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

from alignkit.data.examples import PreferenceExample
from alignkit.data.formats import LoadResult, Record, check_columns, load_records, parse_preference_record

REWARD_FIELDS = ("prompt", "chosen", "rejected", "margin", "labels")


@dataclass(frozen=True)
class RewardExample:
    pair: PreferenceExample
    labels: tuple  # per objective: +1 chosen better, -1 rejected better, 0 not judged
    margin: float = 0.0

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
    return RewardExample(pair, _labels(rec, tuple(objectives)), margin)


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
