"""`alignkit iterate`: rounds of generate -> judge -> train, each round's model making the next
round's data (iterative DPO; I-SHEEP, Liang et al., arXiv 2408.08072; CycleAlign, Hong et al.,
arXiv 2310.16271), with one report across the rounds.

Round r, from model M_r (the config's `model.name_or_path` for r = 0):
  1. sample `k` replies per training prompt from M_r (temperature from `--temperature`);
  2. score them with the reward (`--reward`: any reward spec, a principle judge included);
  3. pair each prompt's best and worst reply when their margin is at least `--min-margin`
     (`datatools.pairs.build_pairs`), written to ROUND/pairs.jsonl;
  4. train on the pairs with the config (`recipe: dpo` or another paired recipe), from M_r, into
     ROUND/run; its final model is M_{r+1};
  5. score M_{r+1}'s greedy replies to the held-out prompts with the same reward, against M_r's
     (a paired bootstrap interval over prompts).
The report (OUT/iterate.md, OUT/iterate.json) has one row per round. Each finished round is
recorded in OUT/iterate.json before the next starts (written atomically: a crash leaves the old
state or the new one, never half of it); run again with the same arguments, a finished round is
not redone. The state also keeps the sha256 of the prompts and held-out files: a later round on
edited files would compare held-out rewards of two different prompt sets, so that is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from alignkit.datatools.jobs import fingerprint
from alignkit.errors import AlignkitError
from alignkit.jsonfile import write_atomic

# What each round's row must hold for the next run to carry on from it (and to write the report).
_ROW_KEYS = ("round", "pairs", "heldout_after", "before", "after", "diff", "ci95", "improved", "worsened", "model")


def _heldout_scores(lm, examples, reward, params) -> list:
    from alignkit.data.prompts import prompt_columns

    prompts = [list(e.prompt) for e in examples]
    replies = [r[0] for r in lm.chat(prompts, params.but(temperature=0.0, n=1))]
    return [float(x) for x in reward(prompts, replies, **prompt_columns(examples))]


def iterate(
    config: str | None,
    overrides: list,
    *,
    prompts: str,
    heldout: str,
    reward_spec,
    rounds: int,
    k: int,
    min_margin: float,
    out: str,
    params,
    seed: int = 0,
    progress: bool = True,
) -> list:
    """Run the rounds (see the module docstring); returns the per-round rows."""
    from alignkit.api import train
    from alignkit.config import load_config
    from alignkit.data.prompts import load_prompt_examples, prompt_columns
    from alignkit.datatools.pairs import build_pairs, sample_and_score, write_pairs
    from alignkit.eval.stats import paired_bootstrap
    from alignkit.generation.text_models import LocalModel
    from alignkit.models import load_model, load_tokenizer, resolve_model_path
    from alignkit.rewards.build import build_reward

    out_dir = Path(out)
    state_path = out_dir / "iterate.json"
    base = load_config(config, list(overrides) + [f"data.train={prompts}"])
    settings = {
        "config": config,
        "overrides": list(overrides),
        "prompts": prompts,
        "heldout": heldout,
        "reward": reward_spec,
        "k": k,
        "min_margin": min_margin,
        "seed": seed,
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
    }
    inputs = {
        "--prompts": {"path": prompts, "sha256": fingerprint(prompts)},
        "--heldout": {"path": heldout, "sha256": fingerprint(heldout)},
    }
    state = read_state(state_path, settings, inputs)
    out_dir.mkdir(parents=True, exist_ok=True)  # after every check: a refused run leaves nothing behind
    reward = build_reward(reward_spec)
    train_ex = load_prompt_examples(prompts).examples
    held_ex = load_prompt_examples(heldout).examples
    model_path = resolve_model_path(base.model.name_or_path, base.cache_dir)
    tokenizer = load_tokenizer(base.model, base.cache_dir)
    rows = state["rounds"]
    if rows:
        model_path = rows[-1]["model"]
    held_before = rows[-1]["heldout_after"] if rows else None
    for r in range(len(rows), rounds):
        rdir = out_dir / f"round-{r + 1}"
        lm = LocalModel(
            load_model(
                dataclasses.replace(base.model, name_or_path=model_path), for_training=False, cache_dir=base.cache_dir
            ),
            tokenizer,
            batch_size=base.generation.batch_size,
            name=model_path,
        )
        if held_before is None:
            held_before = _heldout_scores(lm, held_ex, reward, params)
        convs = [list(e.prompt) for e in train_ex]
        samples, scores = sample_and_score(
            lm, convs, k, params, reward, seed=seed + r, columns=prompt_columns(train_ex), progress=progress
        )
        records, counts = build_pairs(convs, samples, scores, min_margin=min_margin)
        if not records:
            raise AlignkitError(
                f"round {r + 1}: no pairs: every prompt's {k} replies scored within {min_margin} of "
                f"each other ({counts}). Raise k or the temperature, or lower --min-margin."
            )
        rdir.mkdir(parents=True, exist_ok=True)
        write_pairs(rdir / "pairs.jsonl", records)
        del lm
        cfg = load_config(
            config,
            list(overrides)
            + [f"model.name_or_path={model_path}", f"data.train={rdir / 'pairs.jsonl'}", f"output_dir={rdir / 'run'}"],
        )
        result = train(cfg, progress=progress)
        new_path = str(result.final_dir)
        lm = LocalModel(
            load_model(
                dataclasses.replace(base.model, name_or_path=new_path), for_training=False, cache_dir=base.cache_dir
            ),
            tokenizer,
            batch_size=base.generation.batch_size,
            name=new_path,
        )
        held_after = _heldout_scores(lm, held_ex, reward, params)
        del lm
        d = paired_bootstrap(held_before, held_after, seed=seed)
        rows.append(
            {
                "round": r + 1,
                "pairs": len(records),
                "pair_counts": counts,
                "train_reward_mean": sum(map(sum, scores)) / max(1, sum(map(len, scores))),
                "heldout_before": held_before,
                "heldout_after": held_after,
                "before": d.before,
                "after": d.after,
                "diff": d.diff,
                "ci95": [d.lo, d.hi],
                "improved": d.improved,
                "worsened": d.worsened,
                "model": new_path,
            }
        )
        write_atomic(state_path, state, indent=1)
        write_report(out_dir, rows)
        model_path, held_before = new_path, held_after
    write_report(out_dir, rows)
    return rows


def read_state(path: Path, settings: dict, inputs: dict) -> dict:
    """The rounds recorded in OUT/iterate.json, checked against this run's settings and input files
    ({"settings", "inputs", "rounds"}; a fresh state when there is no file)."""
    fresh = {"settings": settings, "inputs": inputs, "rounds": []}
    if not path.exists():
        return fresh
    restart = (
        f"remove {path} to run the rounds again from the start (the round-N directories beside it are "
        "then redone), or use another --out"
    )
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AlignkitError(
            f"{path} is not valid JSON ({e}): the record of the finished rounds was cut short or "
            f"edited, so it cannot be carried on from; {restart}."
        ) from None
    rounds = state.get("rounds") if isinstance(state, dict) else None
    if not (
        isinstance(state, dict)
        and isinstance(state.get("settings"), dict)
        and isinstance(rounds, list)
        and all(isinstance(r, dict) and all(k in r for k in _ROW_KEYS) for r in rounds)
    ):
        raise AlignkitError(
            f"{path} does not hold alignkit iterate's record of finished rounds (an object with "
            f"`settings` and `rounds`, each round with {', '.join(_ROW_KEYS)}); {restart}."
        )
    if state["settings"] != settings:
        changed = sorted(key for key in settings if state["settings"].get(key) != settings[key])
        raise AlignkitError(
            f"{path} holds rounds run with other settings ({', '.join(changed)}); use another "
            "--out or the same settings."
        )
    saved = state.get("inputs")
    if not isinstance(saved, dict):  # written before the inputs were recorded: record them from now on
        print(
            f"alignkit: {path} does not record the contents of --prompts and --heldout; checking them from this run on"
        )
        state["inputs"] = inputs
        return state
    for option, now in inputs.items():
        before = saved.get(option) or {}
        if before.get("sha256") != now["sha256"]:
            raise AlignkitError(
                f"{now['path']} ({option}) changed since the finished rounds in {path} were run: a "
                "new round would be compared with rounds on other prompts. Restore the file as it "
                f"was, or {restart}."
            )
    return state


def write_report(out_dir: Path, rows: list) -> Path:
    """OUT/iterate.md: held-out reward per round with its interval, and the pairs each round made."""
    lines = [
        "# alignkit iterate",
        "",
        "| round | pairs | held-out reward before | after | change [95% CI] | better / worse |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['pairs']} | {r['before']:.3f} | {r['after']:.3f} | {r['diff']:+.3f} "
            f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {r['improved']} / {r['worsened']} |"
        )
    path = out_dir / "iterate.md"
    path.write_text("\n".join(lines) + "\n")
    return path
