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
recorded in OUT/iterate.json before the next starts; run again with the same arguments, a
finished round is not redone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from alignkit.errors import AlignkitError


def _heldout_scores(lm, examples, reward, params) -> list:
    from alignkit.data.prompts import prompt_columns

    prompts = [list(e.prompt) for e in examples]
    replies = [r[0] for r in lm.chat(prompts, params.but(temperature=0.0, n=1))]
    return [float(x) for x in reward(prompts, replies, **prompt_columns(examples))]


def iterate(config: str | None, overrides: list, *, prompts: str, heldout: str, reward_spec, rounds: int, k: int,
            min_margin: float, out: str, params, seed: int = 0, progress: bool = True) -> list:
    """Run the rounds (see the module docstring); returns the per-round rows."""
    from alignkit.config import load_config
    from alignkit.data.prompts import load_prompt_examples, prompt_columns
    from alignkit.datatools.pairs import build_pairs, sample_and_score, write_pairs
    from alignkit.eval.stats import paired_bootstrap
    from alignkit.generation.text_models import LocalModel
    from alignkit.models import load_model, load_tokenizer, resolve_model_path
    from alignkit.rewards.build import build_reward
    from alignkit.train.loop import train

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "iterate.json"
    base = load_config(config, list(overrides) + [f"data.train={prompts}"])
    settings = {"config": config, "overrides": list(overrides), "prompts": prompts, "heldout": heldout,
                "reward": reward_spec, "k": k, "min_margin": min_margin, "seed": seed,
                "max_new_tokens": params.max_new_tokens, "temperature": params.temperature}
    state = json.loads(state_path.read_text()) if state_path.exists() else {"settings": settings, "rounds": []}
    if state["settings"] != settings:
        changed = sorted(key for key in settings if state["settings"].get(key) != settings[key])
        raise AlignkitError(f"{state_path} holds rounds run with other settings ({', '.join(changed)}); use another "
                            "--out or the same settings.")
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
        lm = LocalModel(load_model(dataclasses.replace(base.model, name_or_path=model_path), for_training=False,
                                   cache_dir=base.cache_dir), tokenizer,
                        batch_size=base.generation.batch_size, name=model_path)
        if held_before is None:
            held_before = _heldout_scores(lm, held_ex, reward, params)
        convs = [list(e.prompt) for e in train_ex]
        samples, scores = sample_and_score(lm, convs, k, params, reward, seed=seed + r,
                                           columns=prompt_columns(train_ex), progress=progress)
        records, counts = build_pairs(convs, samples, scores, min_margin=min_margin)
        if not records:
            raise AlignkitError(f"round {r + 1}: no pairs: every prompt's {k} replies scored within {min_margin} of "
                                f"each other ({counts}). Raise k or the temperature, or lower --min-margin.")
        rdir.mkdir(parents=True, exist_ok=True)
        write_pairs(rdir / "pairs.jsonl", records)
        del lm
        cfg = load_config(config, list(overrides) + [f"model.name_or_path={model_path}",
                                                       f"data.train={rdir / 'pairs.jsonl'}", f"output_dir={rdir / 'run'}"])
        result = train(cfg, progress=progress)
        new_path = str(result.final_dir)
        lm = LocalModel(load_model(dataclasses.replace(base.model, name_or_path=new_path), for_training=False,
                                   cache_dir=base.cache_dir), tokenizer, batch_size=base.generation.batch_size, name=new_path)
        held_after = _heldout_scores(lm, held_ex, reward, params)
        del lm
        d = paired_bootstrap(held_before, held_after, seed=seed)
        rows.append({"round": r + 1, "pairs": len(records), "pair_counts": counts,
                     "train_reward_mean": sum(map(sum, scores)) / max(1, sum(map(len, scores))),
                     "heldout_before": held_before, "heldout_after": held_after,
                     "before": d.before, "after": d.after, "diff": d.diff, "ci95": [d.lo, d.hi],
                     "improved": d.improved, "worsened": d.worsened, "model": new_path})
        state_path.write_text(json.dumps(state, indent=1))
        write_report(out_dir, rows)
        model_path, held_before = new_path, held_after
    write_report(out_dir, rows)
    return rows


def write_report(out_dir: Path, rows: list) -> Path:
    """OUT/iterate.md: held-out reward per round with its interval, and the pairs each round made."""
    lines = ["# alignkit iterate", "", "| round | pairs | held-out reward before | after | change [95% CI] | better / worse |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['pairs']} | {r['before']:.3f} | {r['after']:.3f} | {r['diff']:+.3f} "
                     f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {r['improved']} / {r['worsened']} |")
    path = out_dir / "iterate.md"
    path.write_text("\n".join(lines) + "\n")
    return path
