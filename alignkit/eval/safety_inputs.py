"""What the safety evaluation reads: harmful prompts (with compliant targets), benign prompts, the
judge's hand-labelled agreement set, and the judge itself.

Shipped with alignkit (`alignkit/eval/safety_data/`), both written for this project on 2026-12-05
and taken from no other set:
  over_refusal.jsonl   50 benign requests that look sensitive (killing a process, shooting a
                       portrait, a nurse asking about overdose signs), in the categories XSTest
                       describes (Roettger et al., arXiv 2308.01263): homonyms, figurative
                       language, safe targets, safe contexts, definitions, history, public
                       figures, safety information, fiction;
  judge_labels.jsonl   60 (request, reply) pairs labelled refusal or compliance by hand (30 each),
                       with the hard cases a rule meets: refusals that open with "No." or a
                       lecture, compliances that open with "I cannot stress enough".
"""

from __future__ import annotations

from importlib import resources

from alignkit.data.readers import iter_raw
from alignkit.errors import ConfigError, DataError
from alignkit.eval.safety import HarmfulPrompt
from alignkit.rewards.refusal import LABELS, RewardJudge, make_judge

SHIPPED = "shipped"  # the name the summary gives a shipped file


def shipped_path(name: str) -> str:
    return str(resources.files("alignkit.eval").joinpath(f"safety_data/{name}"))


def load_harmful(path: str, limit: int) -> tuple[list, dict]:
    """Harmful requests from prompt records (a `target` column is the compliant reply that refusal
    at depth prefills) or from preference pairs, such as HH-RLHF harmless (the prompt, and the
    rejected reply as the target): the first `limit` usable ones, and what was read."""
    from alignkit.data.prompts import load_prompts_or_pairs

    result, pairs = load_prompts_or_pairs(path)
    items = []
    for e in result.examples[:limit]:
        if pairs:
            target = "\n".join(m["content"] for m in e.rejected)
        else:
            target = e.columns.get("target")
            if target is not None and not isinstance(target, str):
                raise DataError(
                    f"{e.source}: `target` must be a string (a compliant reply); got {type(target).__name__}"
                )
        items.append(HarmfulPrompt(list(e.prompt), target or None, e.source))
    kind = "preference pairs (target: the rejected reply)" if pairs else "prompt records"
    return items, {"path": path, "kind": kind, "used": len(items), "skipped": len(result.skipped)}


def load_benign(path: str | None, limit: int) -> tuple[list, dict]:
    """Benign-but-sensitive prompts (message lists): the user's prompt records or the shipped set."""
    from alignkit.data.prompts import load_prompt_examples

    result = load_prompt_examples(path or shipped_path("over_refusal.jsonl"), on_bad_record="skip")
    prompts = [list(e.prompt) for e in result.examples[:limit]]
    return prompts, {"path": path or SHIPPED, "used": len(prompts), "skipped": len(result.skipped)}


def load_judge_labels(path: str | None) -> tuple[list, str]:
    """Hand-labelled {prompt, reply, label} records (label: refusal or compliance)."""
    where = path or shipped_path("judge_labels.jsonl")
    records = []
    for location, rec in iter_raw(where):
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("prompt", "reply", "label")):
            raise DataError(f"{location}: a judge label needs string fields prompt, reply and label")
        if rec["label"] not in LABELS:
            raise DataError(f"{location}: label {rec['label']!r}; use one of {', '.join(LABELS)}")
        records.append(rec)
    if not records:
        raise DataError(f"{where}: no labelled replies")
    return records, path or SHIPPED


def build_judge(spec: str | None, reward_spec: str | None, threshold: float | None, batch_size: int = 8):
    """`--safety-judge` (rule or file.py:function), or `--safety-judge-reward` (any reward `--reward`
    takes) read against `--safety-judge-threshold`: at or above it a reply counts as a refusal."""
    if reward_spec is not None:
        if spec not in (None, "rule"):
            raise ConfigError("give --safety-judge or --safety-judge-reward, not both")
        from alignkit.rewards import build_reward
        from alignkit.rewards.build import parse_reward_arg

        reward = build_reward(parse_reward_arg(reward_spec), batch_size=batch_size)
        return RewardJudge(reward, 0.0 if threshold is None else threshold, f"reward:{reward_spec}")
    if threshold is not None:
        raise ConfigError("--safety-judge-threshold has no effect without --safety-judge-reward")
    return make_judge(spec)


class SafetyPlan:
    """Everything `alignkit eval --safety` measures with, read and checked before any model loads."""

    def __init__(
        self,
        harmful_prompts: str | None,
        benign_prompts: str | None = None,
        judge: str | None = None,
        judge_reward: str | None = None,
        judge_threshold: float | None = None,
        judge_labels: str | None = None,
        num_prompts: int = 64,
        settings=None,
    ):
        from alignkit.eval.safety import SafetySettings

        if not harmful_prompts:
            raise ConfigError(
                "--safety needs harmful requests: give --harmful-prompts (prompt records, with an optional "
                "`target` column holding a compliant reply, or preference pairs such as "
                "../shared/data/hh_rlhf_harmless/dev.jsonl, whose rejected reply is the target)."
            )
        self.settings = settings or SafetySettings()
        self.harmful, self.harmful_info = load_harmful(harmful_prompts, num_prompts)
        self.benign, self.benign_info = load_benign(benign_prompts, num_prompts)
        self.labels, self.labels_source = load_judge_labels(judge_labels)
        self.judge = build_judge(judge, judge_reward, judge_threshold)


def safety_section(plan: SafetyPlan, tokenizer, policy_replies, reference_replies=None) -> dict:
    """The judge's agreement with the hand labels, the four measurements of the policy and, with a
    reference, of the reference and the paired changes. `*_replies`: () -> (Replies, close)."""
    from alignkit.eval.safety import compare, judge_agreement, measure

    s = plan.settings
    out = {
        "judge": plan.judge.name,
        "judge_agreement": {**judge_agreement(plan.judge, plan.labels), "labels": plan.labels_source},
        "harmful_prompts": plan.harmful_info,
        "benign_prompts": plan.benign_info,
        "settings": {
            "max_new_tokens": s.params.max_new_tokens,
            "temperature": s.params.temperature,
            "samples": s.samples,
            "depths": list(s.depths),
            "jailbreak_n": sorted(set(s.jailbreak_n)),
            "seed": s.seed,
        },
    }
    per = {}
    for side, make in (("reference", reference_replies), ("model", policy_replies)):
        if make is None:
            continue
        replies, close = make()
        try:
            out[side], per[side] = measure(replies, tokenizer, plan.harmful, plan.benign, plan.judge, s)
        finally:
            close()
    if "reference" in per:
        out["change"] = compare(per["reference"], per["model"], s.n_boot, s.seed)
    return out
