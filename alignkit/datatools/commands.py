"""The `alignkit data synth|judge|pairs|rewrite|select|principles` and `alignkit iterate` commands:
arguments in, resumable work item by item (`jobs.RecordLog`), JSONL out with a summary beside it.

Every command takes a model the same way: `--model PATH_OR_ID` (default: the bundled
SmolLM2-135M-Instruct) runs it locally; `--endpoint URL --model NAME` asks an OpenAI-compatible
server (vLLM, llama.cpp, a hosted API) instead, `--concurrency` requests at a time, with the key in
`--api-key-file` (or OPENAI_API_KEY) and, for Magpie and for exact judge log-probs, a local copy of
the served model's tokenizer (`--tokenizer`).

A judge behind an endpoint without `--tokenizer` (or one that does not echo log-probs) reads only
the first reply token's top 20 log-probs; the answers it could not measure are bounded at +-20
(`alignkit.rewards.judge`), and every command that judges counts them in its output and summary.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from alignkit.datatools import checks
from alignkit.datatools.jobs import RecordLog, write_summary
from alignkit.errors import ConfigError, DataError

CHUNK = 16  # items per saved step: an interruption loses at most this much work


def add_model_args(p: argparse.ArgumentParser, temperature: float = 0.7, max_new_tokens: int = 128) -> None:
    p.add_argument(
        "--model",
        help="a model directory or hub id (default: the bundled SmolLM2-135M-Instruct); with "
        "--endpoint, the model name the server serves",
    )
    p.add_argument("--endpoint", help="an OpenAI-compatible server's base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--concurrency", type=int, default=8, help="--endpoint: requests in flight at once")
    p.add_argument(
        "--retries",
        type=int,
        default=4,
        help="--endpoint: retries of a request that failed transiently "
        "(connection error, timeout, HTTP 408/409/429/5xx), with exponential backoff",
    )
    p.add_argument(
        "--tokenizer",
        help="--endpoint: a local copy of the served model's tokenizer (directory or hub "
        "id); Magpie needs it to write the chat template's user header, and a judge to read exact option "
        "log-probs (without it: the first reply token's top 20, and what they miss is bounded and counted)",
    )
    p.add_argument(
        "--api-key-file",
        help="--endpoint: a file holding the server's key, sent as `Authorization: Bearer "
        "<key>` (for `alignkit vllm-serve`: the token file it prints at start); default: the environment "
        "variable OPENAI_API_KEY",
    )
    p.add_argument("--batch-size", type=int, default=16, help="local model: prompts sampled together")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the JSONL file to write (a summary is written beside it)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted run, keeping what it finished "
        "(refused, exit 2, when its settings or an input file's contents changed, or OUT is finished)",
    )
    p.add_argument("--no-progress", action="store_true")


def _lm(args):
    from alignkit.generation.text_models import text_model

    return text_model(
        model=args.model,
        endpoint=args.endpoint,
        concurrency=args.concurrency,
        retries=args.retries,
        batch_size=args.batch_size,
        tokenizer=args.tokenizer if args.endpoint else None,
        api_key=checks.api_key(args),
    )


def _params(args, **changes):
    from alignkit.generation.decode import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature).but(**changes)


def _settings(args, *keys) -> dict:
    common = ("model", "max_new_tokens", "temperature", "seed")  # not the endpoint URL: a server may move
    return {k: getattr(args, k) for k in common + keys}


def _run(log: RecordLog, ids: list, work, progress: bool, desc: str, chunk: int = CHUNK) -> None:
    """Do `work(chunk_ids) -> records` for the ids the log does not hold yet, `chunk` at a time."""
    from tqdm.auto import tqdm

    todo = log.todo(ids)
    if log.done:
        print(
            f"alignkit: resuming: {len(log.done)} finished records kept"
            + (" (a torn last line was dropped and is done again)" if log.torn else "")
            + f", {len(todo)} to do"
        )
    with tqdm(total=len(todo), desc=desc, disable=not progress) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            for record in work(part):
                log.add(record)
            bar.update(len(part))


def _read_pairs(path: str) -> list:
    """Preference pairs in any format alignkit trains on (HH-RLHF transcripts included), as
    {prompt: messages, chosen: text, rejected: text}; a record alignkit would refuse is an error."""
    from alignkit.data.formats import load_preference_examples

    result = load_preference_examples(path, on_bad_record="skip")
    if result.skipped:  # counted and named, never dropped silently
        where, why = result.skipped[0]
        print(f"alignkit: {len(result.skipped)} records of {path} skipped as unusable (first: {where}: {why})")
    out = []
    for ex in result.examples:
        text = lambda side: "\n".join(m["content"] for m in side)  # noqa: E731
        out.append({"prompt": [dict(m) for m in ex.prompt], "chosen": text(ex.chosen), "rejected": text(ex.rejected)})
    return out


def _finish(log: RecordLog, records: list, title: str, counts: dict, notes=(), plots=()) -> None:
    out = log.finish(records)
    md, _ = write_summary(out, title, counts, notes, plots)
    print(f"alignkit: {len(records)} records written to {out} (summary: {md})")


# ---------------------------------------------------------------------------------------------
# Each command checks its options and input records first (`checks`), then opens the record log
# (which refuses a finished or foreign output at once), and only then loads models.


def cmd_synth(args) -> int:
    from alignkit.datatools import filters, synth

    spec, prompts = checks.synth_options(args)
    log = RecordLog(
        args.out,
        _settings(args, "method", "n", "principles", "prompts"),
        args.resume,
        inputs={"--principles": args.principles, "--prompts": args.prompts} if spec else None,
    )
    lm, params = _lm(args), _params(args)
    # One logged item per chunk of CHUNK records: a chunk's records and what it dropped (empty
    # instructions or replies) are saved together, so a resumed run redoes only unfinished chunks.
    if args.method == "magpie":
        tokenizer = getattr(lm, "tokenizer", None)
        if tokenizer is None:  # an endpoint: the template comes from the model's tokenizer, read locally
            from alignkit.config import ModelConfig
            from alignkit.models import load_tokenizer

            tokenizer = load_tokenizer(ModelConfig(name_or_path=args.tokenizer))
        total = args.n

        def make(start, size):
            return synth.magpie(lm, tokenizer, size, params, seed=args.seed * 1_000_003 + start)
    else:
        total = len(prompts)

        def make(start, size):
            return synth.self_align(
                lm,
                prompts[start : start + size],
                spec.principles,
                spec.exemplars,
                params,
                seed=args.seed * 1_000_003 + start,
            )

    def work(starts):
        out = []
        for start in starts:
            recs = make(start, min(CHUNK, total - start))
            out.append({"id": start, "records": list(recs), "counts": dict(recs.counts)})
        return out

    _run(log, list(range(0, total, CHUNK)), work, not args.no_progress, args.method, chunk=1)
    chunks = [log.done[s] for s in range(0, total, CHUNK)]
    raw = [r for c in chunks for r in c["records"]]
    synth_counts: dict = {}
    for c in chunks:
        for k, v in c["counts"].items():
            synth_counts[k] = synth_counts.get(k, 0) + v
    kept, counts = filters.filter_records(
        raw,
        text_of=lambda r: r["prompt"] + "\n" + r["completion"],
        reply_of="completion",
        min_words=args.min_words,
        max_words=args.max_words,
        max_repetition=args.max_repetition,
        drop_refusals=not args.keep_refusals,
        dedup_threshold=args.dedup_threshold,
    )
    from alignkit.datatools.select import plot_scores

    plot = Path(args.out).with_name(Path(args.out).name + ".lengths.svg")
    if raw:
        plot_scores(
            [len(r["prompt"].split()) for r in raw],
            [len(r["prompt"].split()) for r in kept],
            plot,
            label="prompt length (words)",
            title="prompt lengths: generated vs kept",
        )
        plot_note = f"prompt lengths before and after the filters: {plot.name}"
    else:  # every instruction or reply came back empty (counted above): nothing to plot
        plot_note = "no prompt-length plot: the model wrote no usable record (see the synth counts)"
    _finish(
        log,
        kept,
        f"alignkit data synth --method {args.method}",
        {**{f"synth: {k}": v for k, v in synth_counts.items()}, **{f"filter: {k}": v for k, v in counts.items()}},
        notes=[
            f"model: {args.model or 'SmolLM2-135M-Instruct (bundled)'}"
            + (f" at {args.endpoint}" if args.endpoint else ""),
            _diversity([r["prompt"] for r in kept]),
            plot_note,
            "filters in order: too short, too long, repetitive, refusal, near-duplicate (MinHash); each "
            "record is counted by the first filter that removes it",
        ],
    )
    return 0


def _diversity(texts: list) -> str:
    from alignkit.datatools.filters import distinct_n

    words = [len(str(t).split()) for t in texts]
    return (
        f"kept prompts: distinct-1 {distinct_n(texts, 1):.3f}, distinct-2 {distinct_n(texts, 2):.3f}, "
        f"{sum(words) / max(len(words), 1):.1f} words on average, {len(set(texts))} distinct of {len(texts)}"
    )


def _judge(principles_file: str, lm):
    from alignkit.rewards.judge import PrincipleJudge

    return PrincipleJudge.from_file(lm, principles_file)


def _judge_report(lm, clipped: int, answers: int) -> tuple[dict, list]:
    """A judging command's count of bounded answers and note on how option log-probs were read, for
    its summary; the count is printed too when it is not 0 (never silently: see the module doc)."""
    from alignkit.generation.text_models import EndpointModel
    from alignkit.rewards.judge import SCORE_LIMIT

    key = f"judge answers bounded at +-{SCORE_LIMIT:g} (an option outside the endpoint's top 20 log-probs)"
    source = "exact option log-probs (local model)"
    if isinstance(lm, EndpointModel):
        source = lm.logprob_source or "no judge answer was read in this run"
    if clipped:
        print(
            f"alignkit: {clipped} of {answers} judge answers were bounded at +-{SCORE_LIMIT:g}: an option was not "
            "among the first reply token's top 20 log-probs the endpoint reported, so its size is unknown. Give "
            "--tokenizer (the served model's) for exact log-probs from a server that echoes them (vLLM does)."
        )
    return {key: f"{clipped}/{answers}"}, [f"judge log-probs: {source}"]


def cmd_judge(args) -> int:
    """Score prompt/completion records, or compare the two sides of preference pairs."""
    from alignkit.rewards.principles import load_principles

    checks.model_options(args)
    raw = checks.read_rows(args.data, "--data")
    paired = "chosen" in raw[0][1]
    if paired:
        rows = _read_pairs(args.data)
    else:
        for where, rec in raw:
            checks.prompt(where, rec, "--data", "judge")
            checks.text_column(
                where,
                rec,
                "completion",
                "--data",
                "judge",
                why=" to score it (or `chosen` and `rejected`, in every record, to compare pairs)",
            )
        rows = [rec for _, rec in raw]
    load_principles(args.principles)  # its mistakes before any model loads
    log = RecordLog(
        args.out,
        _settings(args, "data", "principles", "tokenizer"),
        args.resume,
        inputs={"--data": args.data, "--principles": args.principles},
    )
    lm = _lm(args)
    judge = _judge(args.principles, lm)

    # Each logged record keeps how many of its judge answers were bounded (`_clipped`, not written
    # to OUT), so a resumed run still counts the ones its first part found.
    def work(chunk):
        recs = [rows[i] for i in chunk]
        if paired:
            vals = judge.compare(
                [r["prompt"] for r in recs], [r["chosen"] for r in recs], [r["rejected"] for r in recs]
            )
            return [
                {"id": i, **r, "judge_margin": v, "_clipped": c}
                for i, r, v, c in zip(chunk, recs, vals, judge.last_clipped)
            ]
        vals = judge.score([r["prompt"] for r in recs], [r["completion"] for r in recs])
        return [
            {"id": i, **r, "judge_score": v, "_clipped": c} for i, r, v, c in zip(chunk, recs, vals, judge.last_clipped)
        ]

    _run(log, list(range(len(rows))), work, not args.no_progress, "judge")
    out = [{k: v for k, v in log.done[i].items() if k not in ("id", "_clipped")} for i in range(len(rows))]
    key = "judge_margin" if paired else "judge_score"
    vals = [r[key] for r in out]
    counts = {"records": len(out), f"mean {key}": round(sum(vals) / max(len(vals), 1), 4)}
    if paired:
        counts["judge agrees with chosen (margin > 0)"] = f"{sum(v > 0 for v in vals)}/{len(vals)}"
    clipped = sum(log.done[i].get("_clipped", 0) for i in range(len(rows)))
    judged, notes = _judge_report(lm, clipped, len(out) * (2 if paired else 1))
    _finish(log, out, "alignkit data judge", {**counts, **judged}, notes=[f"principles: {args.principles}", *notes])
    return 0


def cmd_pairs(args) -> int:
    from alignkit.data.prompts import load_prompt_examples, prompt_columns
    from alignkit.datatools.pairs import build_pairs, sample_and_score
    from alignkit.rewards.build import build_reward, parse_reward_arg
    from alignkit.rewards.principles import load_principles

    checks.model_options(args)
    if bool(args.reward) == bool(args.principles):
        raise ConfigError(
            "give one of --reward SPEC (any reward: a function, a reward model, ...) and "
            "--principles FILE (the principle judge)."
        )
    checks.at_least(args.k, 2, "--k", " (replies per prompt: a pair needs two)")
    checks.within(args.min_margin, 0.0, math.inf, "--min-margin", "a reward difference")
    examples = load_prompt_examples(args.prompts).examples
    if args.principles:
        load_principles(args.principles)  # its mistakes before any model loads
    spec = parse_reward_arg(args.reward) if args.reward else None
    log = RecordLog(
        args.out,
        _settings(args, "prompts", "k", "reward", "principles", "tokenizer"),
        args.resume,
        inputs={"--prompts": args.prompts, "--principles": args.principles, **checks.reward_inputs(spec)},
    )
    reward = build_reward(spec) if spec is not None else None
    lm = _lm(args)
    judge = _judge(args.principles, lm) if args.principles else None
    reward = judge or reward

    # A chunk's judge answers and bounded ones are logged with its first record, so that a resumed
    # run still counts them.
    def work(chunk):
        exs = [examples[i] for i in chunk]
        before = (judge.answers, judge.clipped) if judge else (0, 0)
        samples, scores = sample_and_score(
            lm,
            [list(e.prompt) for e in exs],
            args.k,
            _params(args),
            reward,
            seed=args.seed + chunk[0],
            columns=prompt_columns(exs),
        )
        recs = [{"id": i, "samples": s, "scores": sc} for i, s, sc in zip(chunk, samples, scores)]
        if judge and recs:
            recs[0]["judge_answers"], recs[0]["judge_clipped"] = judge.answers - before[0], judge.clipped - before[1]
        return recs

    _run(log, list(range(len(examples))), work, not args.no_progress, "pairs")
    done = [log.done[i] for i in range(len(examples))]
    records, counts = build_pairs(
        [list(e.prompt) for e in examples],
        [d["samples"] for d in done],
        [d["scores"] for d in done],
        min_margin=args.min_margin,
    )
    notes = []
    if judge:
        judged, notes = _judge_report(
            lm, sum(d.get("judge_clipped", 0) for d in done), sum(d.get("judge_answers", 0) for d in done)
        )
        counts = {**counts, **judged}
    _finish(
        log,
        records,
        "alignkit data pairs",
        counts,
        notes=[f"{args.k} replies per prompt; chosen = best, rejected = worst, margin >= {args.min_margin}", *notes],
    )
    return 0


def cmd_steps(args) -> int:
    """Math-Shepherd step labels (`alignkit.datatools.steps`): resumable, written atomically."""
    from alignkit.data.prompts import load_prompt_examples
    from alignkit.datatools.steps import label_steps, solution_steps
    from alignkit.rewards.build import build_reward, parse_reward_arg

    checks.model_options(args)
    checks.at_least(args.rollouts, 1, "--rollouts", " (continuations sampled from each step)")
    checks.at_least(args.solutions, 1, "--solutions", " (solutions sampled for a record without steps)")
    if not args.separator:
        raise ConfigError("--separator must not be empty: it splits a solution into steps (default: a newline).")
    examples = load_prompt_examples(args.data).examples
    for ex in examples:
        steps = ex.columns.get("steps")
        if steps is not None and not (isinstance(steps, list) and steps and all(isinstance(s, str) for s in steps)):
            raise DataError(f"{ex.source}: `steps` must be a non-empty list of strings, found {steps!r}")
    spec = parse_reward_arg(args.verifier)
    log = RecordLog(
        args.out,
        _settings(args, "data", "rollouts", "solutions", "separator", "verifier", "label", "tokenizer"),
        args.resume,
        inputs={"--data": args.data, **checks.reward_inputs(spec)},
    )
    verifier = build_reward(spec)
    lm = _lm(args)
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(
            "alignkit data steps continues each solution from its steps as raw text, through the chat "
            "template: with --endpoint, give --tokenizer (a local copy of the served model's tokenizer)."
        )

    def work(chunk):
        items, ids = [], []
        for i in chunk:
            ex = examples[i]
            columns = {k: v for k, v in ex.columns.items() if k not in ("steps", "completion")}
            prompt = [dict(m) for m in ex.prompt]
            if "steps" in ex.columns:
                solutions = [list(ex.columns["steps"])]
            elif isinstance(ex.columns.get("completion"), str):
                solutions = [solution_steps(ex.columns["completion"], args.separator)]
            else:  # no solution given: the model writes some
                texts = lm.chat([prompt], _params(args, n=args.solutions), seed=args.seed + i)[0]
                solutions = [solution_steps(t, args.separator) for t in texts]
            for j, steps in enumerate(solutions):
                items.append({"prompt": prompt, "steps": steps, "columns": columns})
                ids.append((i, j))
        records = label_steps(
            lm,
            tokenizer,
            items,
            verifier,
            _params(args),
            rollouts=args.rollouts,
            separator=args.separator,
            seed=args.seed + chunk[0],
        )
        by_id: dict = {}
        for (i, _), rec in zip(ids, records):
            by_id.setdefault(i, []).append(rec)
        return [{"id": i, "records": by_id.get(i, [])} for i in chunk]

    _run(log, list(range(len(examples))), work, not args.no_progress, "steps", chunk=4)
    records = [{**r, "labels": r[args.label]} for i in range(len(examples)) for r in log.done[i]["records"]]
    steps = [len(r["steps"]) for r in records]
    right = sum(h for r in records for h in r["hard"])
    counts = {
        "records": len(records),
        "steps": sum(steps),
        "steps labelled right (hard)": int(right),
        "solutions with the right answer": sum(r["solution_correct"] for r in records),
    }
    _finish(
        log,
        records,
        "alignkit data steps",
        counts,
        notes=[
            f"{args.rollouts} continuations from each step; hard label: any reaches the answer, soft: the share "
            f"(Math-Shepherd, arXiv 2312.08935); `labels` holds the {args.label} ones; verifier: {args.verifier}"
        ],
    )
    return 0


def cmd_rewrite(args) -> int:
    from alignkit.inference.rewrite import rewrite, rewrite_messages

    checks.model_options(args)
    raw = checks.read_rows(args.data, "--data")
    for where, rec in raw:
        checks.prompt(where, rec, "--data", "rewrite")
    rows = [rec for _, rec in raw]
    log = RecordLog(args.out, _settings(args, "data"), args.resume, inputs={"--data": args.data})
    lm = _lm(args)

    def work(chunk):
        # Text prompts and message lists are rewritten apart, so each record keeps its prompt's form
        # (a text prompt never comes back as a message list because a neighbour was one).
        texts = [i for i in chunk if isinstance(rows[i]["prompt"], str)]
        convs = [i for i in chunk if not isinstance(rows[i]["prompt"], str)]
        new = {}
        if texts:
            new.update(zip(texts, rewrite(lm, [rows[i]["prompt"] for i in texts], _params(args), args.seed + chunk[0])))
        if convs:  # message lists: the last user message is rewritten
            new.update(
                zip(
                    convs, rewrite_messages(lm, [rows[i]["prompt"] for i in convs], _params(args), args.seed + chunk[0])
                )
            )
        return [{"id": i, **rows[i], "prompt": new[i], "original_prompt": rows[i]["prompt"]} for i in chunk]

    _run(log, list(range(len(rows))), work, not args.no_progress, "rewrite")
    out = [{k: v for k, v in log.done[i].items() if k != "id"} for i in range(len(rows))]
    unchanged = sum(r["prompt"] == r["original_prompt"] for r in out)
    _finish(log, out, "alignkit data rewrite", {"records": len(out), "kept as they were": unchanged})
    return 0


def cmd_select(args) -> int:
    from alignkit.datatools import select
    from alignkit.rewards.build import build_reward, parse_reward_arg

    if args.endpoint:
        raise ConfigError("alignkit data select embeds the records with a local model: leave out --endpoint.")
    checks.model_options(args)
    checks.at_least(args.budget, 1, "--budget", " (examples to select)")
    checks.within(args.min_distance, 0.0, 2.0, "--min-distance", "a cosine distance")
    raw = checks.read_rows(args.data, "--data")
    for where, rec in raw:
        checks.prompt(where, rec, "--data", "select")
        checks.text_column(where, rec, "completion", "--data", "select", required=False)
    rows = [rec for _, rec in raw]
    spec = parse_reward_arg(args.reward) if args.reward else None
    log = RecordLog(
        args.out,
        _settings(args, "data", "reward", "budget", "min_distance"),
        args.resume,
        inputs={"--data": args.data, **checks.reward_inputs(spec)},
    )
    lm = _lm(args)
    quality = build_reward(spec) if spec is not None else None
    text = lambda r: r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]  # noqa: E731

    def work(chunk):
        recs = [rows[i] for i in chunk]
        comp = select.complexity_score(lm, [text(r) for r in recs])
        qual = (
            quality([r["prompt"] for r in recs], [r.get("completion", "") for r in recs])
            if quality
            else [1.0] * len(recs)
        )
        for i, q in zip(chunk, qual):  # Deita multiplies complexity by quality: it must be positive
            if not (math.isfinite(float(q)) and float(q) > 0):
                raise DataError(
                    f"{raw[i][0]}: --reward {args.reward} gives {float(q)}; the quality score is "
                    "multiplied by the complexity, so it must be a positive number. Map the reward to a "
                    "positive scale (e.g. a sigmoid), or leave out --reward to rank by complexity alone "
                    f"(a changed --reward cannot --resume: delete {log.log} and {log.meta} first)."
                )
        return [{"id": i, "complexity": c, "quality": float(q)} for i, c, q in zip(chunk, comp, qual)]

    _run(log, list(range(len(rows))), work, not args.no_progress, "select: scores")
    scored = [log.done[i] for i in range(len(rows))]
    comp = [s["complexity"] for s in scored]
    scores = select.evol_score(comp, [s["quality"] for s in scored]) if quality else comp
    emb = select.embed(
        lm.model, lm.tokenizer, [text(r) + "\n" + str(r.get("completion", "")) for r in rows], args.batch_size
    )
    picked, counts = select.select(scores, emb, args.budget, min_distance=args.min_distance)
    plot = Path(args.out).with_name(Path(args.out).name + ".scores.svg")
    select.plot_scores(scores, [scores[i] for i in picked], plot)
    out = [{**rows[i], "select_score": scores[i]} for i in picked]
    _finish(
        log,
        out,
        "alignkit data select",
        {"records": len(rows), **counts, "selected": len(out)},
        notes=[
            f"score = complexity{' x quality (' + str(args.reward) + ')' if quality else ''}; "
            f"min cosine distance {args.min_distance}",
            f"score distributions: {plot.name}",
        ],
    )
    return 0


def cmd_principles(args) -> int:
    from alignkit.datatools import principles
    from alignkit.rewards.judge import PrincipleJudge

    checks.model_options(args)
    checks.at_least(args.limit, 2, "--limit", " (pairs to use: some to propose from, some held out)")
    checks.within(
        args.heldout_fraction, 0.0, 1.0, "--heldout-fraction", "a share of the pairs", open_low=True, open_high=True
    )
    checks.at_least(args.max_principles, 1, "--max-principles")
    pairs = _read_pairs(args.pairs)[: args.limit]
    split = int(len(pairs) * (1 - args.heldout_fraction))
    train_pairs, held_pairs = pairs[:split], pairs[split:]
    if not train_pairs or not held_pairs:
        raise ConfigError(
            f"{args.pairs}: {len(pairs)} pairs leave no training or held-out pairs at "
            f"--heldout-fraction {args.heldout_fraction}; give more pairs or another fraction."
        )
    log = RecordLog(
        args.out,
        _settings(args, "pairs", "limit", "heldout_fraction", "max_principles"),
        args.resume,
        inputs={"--pairs": args.pairs},
    )
    lm = _lm(args)
    judges: list = []  # every one-principle judge, for the count of bounded answers

    def judge_for(principle):
        judges.append(PrincipleJudge(lm, [principle]))
        return judges[-1]

    found = principles.extract(
        lm,
        judge_for,
        train_pairs,
        held_pairs,
        max_principles=args.max_principles,
        params=_params(args),
        seed=args.seed,
        progress=not args.no_progress,
    )
    judged, notes = _judge_report(lm, sum(j.clipped for j in judges), sum(j.answers for j in judges))
    _finish(
        log,
        list(found),
        "alignkit data principles",
        {
            "train pairs": len(train_pairs),
            "held-out pairs": len(held_pairs),
            "principles proposed": found.proposed,
            "after deduplication": found.unique,
            "kept": len(found),
            "held-out agreement of the kept principles' majority vote": round(found.vote_agreement, 3),
            **judged,
        },
        notes=[
            "agreement: the share of pairs whose chosen reply the one-principle judge prefers; 0.5 is chance",
            *notes,
        ],
    )
    return 0


def cmd_iterate(args) -> int:
    from alignkit.datatools.iterate import iterate
    from alignkit.rewards.build import parse_reward_arg

    checks.model_options(args)
    checks.at_least(args.rounds, 1, "--rounds")
    checks.at_least(args.k, 2, "--k", " (replies per prompt: a pair needs two)")
    checks.within(args.min_margin, 0.0, math.inf, "--min-margin", "a reward difference")
    rows = iterate(
        args.config,
        args.overrides,
        prompts=args.prompts,
        heldout=args.heldout,
        reward_spec=parse_reward_arg(args.reward),
        rounds=args.rounds,
        k=args.k,
        min_margin=args.min_margin,
        out=args.out,
        params=_params(args),
        seed=args.seed,
        progress=not args.no_progress,
    )
    for r in rows:
        print(
            f"round {r['round']}: {r['pairs']} pairs; held-out reward {r['before']:.3f} -> {r['after']:.3f} "
            f"({r['diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}])"
        )
    print(f"alignkit: report in {Path(args.out) / 'iterate.md'}")
    return 0


def add_parsers(data_sub, sub) -> None:
    """The data tools' subcommands under `alignkit data`, and `alignkit iterate`."""
    q = data_sub.add_parser(
        "synth",
        help="synthesise SFT data: Magpie (instructions from the chat template alone) "
        "or Self-Align (principle-driven answers)",
    )
    add_model_args(q, temperature=1.0)
    q.add_argument("--method", choices=["magpie", "self-align"], required=True)
    q.add_argument("--n", type=int, default=200, help="magpie: instructions to synthesise")
    q.add_argument("--principles", help="self-align: YAML with `principles` and `exemplars`")
    q.add_argument("--prompts", help="self-align: JSONL prompt records to answer")
    q.add_argument("--min-words", type=int, default=3)
    q.add_argument("--max-words", type=int, default=400)
    q.add_argument(
        "--max-repetition", type=float, default=0.3, help="drop texts whose repeated word-trigram share exceeds this"
    )
    q.add_argument("--keep-refusals", action="store_true")
    q.add_argument(
        "--dedup-threshold", type=float, default=0.7, help="MinHash Jaccard at which a record is a near-duplicate"
    )
    q.set_defaults(fn=cmd_synth)

    q = data_sub.add_parser("judge", help="score records (or compare pairs) with a principle-following judge (SALMON)")
    add_model_args(q, temperature=0.0)
    q.add_argument("--data", required=True, help="prompt/completion records, or chosen/rejected pairs")
    q.add_argument("--principles", required=True, help="YAML with `principles` (and optional templates)")
    q.set_defaults(fn=cmd_judge)

    q = data_sub.add_parser("pairs", help="sample K replies per prompt, score them, write chosen/rejected pairs")
    add_model_args(q, temperature=1.0)
    q.add_argument("--prompts", required=True)
    q.add_argument("--k", type=int, default=4)
    q.add_argument("--reward", help="a reward spec (as online.rewards), e.g. numeric_match or rewards.py:score")
    q.add_argument("--principles", help="score with the principle judge instead of --reward")
    q.add_argument("--min-margin", type=float, default=0.0)
    q.set_defaults(fn=cmd_pairs)

    q = data_sub.add_parser(
        "steps", help="label solution steps by Monte Carlo rollouts from each step (Math-Shepherd), for recipe: prm"
    )
    add_model_args(q, temperature=0.7)
    q.add_argument(
        "--data",
        required=True,
        help="records with a `prompt`, the verifier's columns (e.g. `answer`) and `steps` (a list) or "
        "`completion` (split at --separator); without either, --solutions are sampled",
    )
    q.add_argument("--rollouts", type=int, default=8, help="continuations sampled from each step")
    q.add_argument("--solutions", type=int, default=1, help="solutions sampled for a record without steps")
    q.add_argument("--separator", default="\n", help="what separates steps (default: a newline)")
    q.add_argument("--verifier", default="numeric_match", help="a reward spec: a reply reaches the answer when > 0")
    q.add_argument("--label", choices=["hard", "soft"], default="hard", help="which labels go in `labels`")
    q.set_defaults(fn=cmd_steps)

    q = data_sub.add_parser("rewrite", help="rewrite instructions to state intent and constraints (P-Aligner)")
    add_model_args(q, temperature=0.0)
    q.add_argument("--data", required=True, help="records with a `prompt`")
    q.set_defaults(fn=cmd_rewrite)

    q = data_sub.add_parser("select", help="pick a budget of complex, high-quality, diverse examples (Deita)")
    add_model_args(q, temperature=0.0)
    q.add_argument("--data", required=True, help="prompt (and completion) records")
    q.add_argument("--budget", type=int, required=True)
    q.add_argument("--reward", help="the quality score (a reward spec); without it complexity alone ranks")
    q.add_argument(
        "--min-distance", type=float, default=0.1, help="cosine distance below which an example is redundant"
    )
    q.set_defaults(fn=cmd_select)

    q = data_sub.add_parser("principles", help="compress preference pairs into principles (Inverse Constitutional AI)")
    add_model_args(q, temperature=0.7)
    q.add_argument("--pairs", required=True)
    q.add_argument("--limit", type=int, default=None, help="use the first N pairs")
    q.add_argument("--heldout-fraction", type=float, default=0.3)
    q.add_argument("--max-principles", type=int, default=5)
    q.set_defaults(fn=cmd_principles)

    q = sub.add_parser("iterate", help="rounds of sample -> score -> pairs -> train (DPO) -> evaluate")
    q.add_argument("-c", "--config", help="the training config of each round (e.g. recipe: dpo)")
    q.add_argument("overrides", nargs="*", help="key=value config overrides")
    q.add_argument("--prompts", required=True)
    q.add_argument("--heldout", required=True)
    q.add_argument("--reward", required=True)
    q.add_argument("--rounds", type=int, default=1)
    q.add_argument("--k", type=int, default=4)
    q.add_argument("--min-margin", type=float, default=0.5)
    q.add_argument("--max-new-tokens", type=int, default=48)
    q.add_argument("--temperature", type=float, default=1.0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True)
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(fn=cmd_iterate)
