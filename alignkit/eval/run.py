"""`alignkit eval`: what alignment did to a model, measured against its reference.

Three parts, each run when its inputs are given, all written to `<output_dir>/metrics.json` (the
schema `alignkit.report` reads):
  preference  (--data): ranking accuracy of the policy (sum and mean log-prob), implicit-reward
              accuracy and margin against the reference, the idealized ranking accuracy that the
              reference and beta allow (arXiv 2405.19534), reward-model accuracy, length bias,
              likelihood displacement of chosen and rejected (arXiv 2410.08847);
  generation  (--reward and a reference): one sampled reply per held-out prompt from policy and
              reference, scored by the reward; win rate with a bootstrap interval, and KL(policy ||
              reference) estimated on the policy's samples;
  checkpoints (--checkpoints RUN_DIR): per saved checkpoint, KL, reward, win rate, top-k entropy
              and mass (arXiv 2410.11677) and the chosen log-prob change: over-optimisation signs;
  strategy    (--strategy and --reward): an inference-time strategy evaluated like a model: its
              reward and win rate against plain sampling from the same model on the same prompts,
              its KL from sampling (estimate or bound, see `alignkit.inference.result`), and its
              cost (seconds, new and prompt tokens, and each as a ratio to sampling's);
  safety      (--safety): harmful compliance, over-refusal, refusal at depth and best-of-N jailbreak
              success of the model and the reference, and the paired change (`alignkit.eval.safety`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignkit import jsonfile
from alignkit import logprob_passes as passes
from alignkit.config import ModelConfig
from alignkit.data.batching import TokenBatch, collate_pairs
from alignkit.data.formats import load_preference_examples
from alignkit.data.heldout import FILENAME as HELDOUT_FILE
from alignkit.data.heldout import read_heldout, select_sources
from alignkit.data.tokenize import tokenize_pairs
from alignkit.data.vision import has_images, prompt_images, text_of, thumbnail_uri
from alignkit.errors import ConfigError
from alignkit.eval import metrics as M
from alignkit.generation.hf import SamplingParams, generate
from alignkit.logprobs import scored_hidden
from alignkit.models import load_model, load_tokenizer, resolve_device
from alignkit.rewards.functions import score_ragged
from alignkit.rewards.transforms import combine_log_sigmoid


@dataclass
class EvalConfig:
    model: str
    reference: str | None = None
    data: str | None = None
    rewards: list = field(default_factory=list)  # reward callables (alignkit.rewards)
    reward_transform: str = "none"  # "none": sum of rewards; "log_sigmoid": sum of log sigmoid(r - r_ref(x))
    beta: float = 0.1
    max_length: int = 1024
    batch_size: int = 8
    num_prompts: int = 64
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=128, temperature=1.0))
    checkpoints: str | None = None
    # How `data` is read: the run's data settings with --run, else the defaults of a plain pairs file.
    columns: dict = field(default_factory=dict)
    split: str | None = None
    on_bad_record: str = "skip"
    max_prompt_length: int | None = None
    data_format: str = "paired"  # "paired" (formats.load_preference_examples) or "masked" (Mask-DPO records)
    heldout_sources: list | None = None  # evaluate only these examples of `data` (a run's heldout.json)
    heldout_record: str | None = None  # the file that listed them, for messages
    output_dir: str = "eval"
    seed: int = 0
    device: str = "auto"
    cache_dir: str | None = None
    progress: bool = True
    strategy: str | None = None  # evaluate an inference-time strategy against plain sampling
    strategy_options: object = None  # alignkit.inference.strategies.StrategyOptions
    prompts: str | None = None  # prompt records for the strategy part (else the --data pairs' prompts)
    parallel: object = None  # an alignkit Dist under torchrun: the log-prob passes split over the processes
    # `--backend vllm`: () -> a vLLM sampler of the policy (and of the reference), made when first needed
    sampler: object = None
    reference_sampler: object = None
    # steering (alignkit.inference.steering): the policy steered throughout, or a sweep of strengths
    steer: str | None = None
    steer_strength: float = 1.0
    steer_positions: str = "all"
    steer_sweep: list | None = None  # strengths (alignkit.eval.steering.steering_sweep)
    steer_norm: str = "relative"  # strengths as multiples of each layer's fitted vector, or absolute norms
    behaviour_prompts: str | None = None  # harmful prompts: refusal minus compliance of sampled replies
    behaviour_judge: str | None = None  # `rule` (default) or file.py:function (alignkit.rewards.refusal)
    accuracy: str | None = None  # questions with known answers: helpfulness as accuracy
    helpfulness: str | None = None  # prompt/completion records: per-token NLL (secondary diagnostic)
    representation_layers: list | None = None
    # InfAlign (alignkit.rewards.calibration): expected best-of-n win rates against the reference
    bon_n: list | None = None
    calibration_k: int = 16
    # safety (alignkit.eval.safety_inputs.SafetyPlan): harmful compliance, over-refusal, refusal at
    # depth and jailbreak robustness, of the model and (with a reference) of the reference
    safety: object = None


class _Models:
    """Loads models once each (policy, reference, checkpoints) in eval mode on one device. A
    sharded checkpoint (a `dcp/` directory, from a run on several processes) is assembled first."""

    def __init__(self, cfg: EvalConfig):
        self.cfg, self.device = cfg, resolve_device(cfg.device)

    def load(self, path: str):
        if (Path(path) / "dcp").is_dir():
            from alignkit.train.export import load_checkpoint_model

            return load_checkpoint_model(Path(path)).to(self.device).eval()
        mc = ModelConfig(name_or_path=path, dtype="float32", device=str(self.device))
        return load_model(mc, device=self.device, for_training=False, cache_dir=self.cfg.cache_dir).eval()


def pair_tables(model, items: list, pad_id: int, batch_size: int, parallel=None) -> torch.Tensor:
    """[N, 2] summed log-probs (chosen, rejected), each process computing its share (`parallel`)."""
    return passes.parallel_ref_logps(
        model,
        items,
        lambda b: collate_pairs(b, pad_id),
        batch_size,
        1024,
        next(model.parameters()).device,
        contextlib.nullcontext,
        desc="log-probs",
        parallel=parallel,
    )


# Recipes whose held-out examples are preference pairs, and the loader (`EvalConfig.data_format`) of each.
PAIR_RECIPES = {"dpo": "paired", "masked": "masked"}


def heldout_settings(run_dir) -> dict:
    """EvalConfig fields (plus `data` and `max_length`) that read exactly the pairs a run held out,
    from its heldout.json; an error saying what to do when the run has none to give."""
    rec, path = read_heldout(run_dir), str(Path(run_dir) / HELDOUT_FILE)
    if rec.recipe not in PAIR_RECIPES:
        raise ConfigError(
            f"--run {run_dir}: the run trained recipe `{rec.recipe}`, whose held-out examples are "
            "not preference pairs; give --data with pairs to measure the model on."
        )
    if rec.sources is None:
        raise ConfigError(f"{path} does not list the held-out examples; give --data with the pairs to evaluate.")
    if not rec.sources:
        raise ConfigError(
            f"{path}: the run held out no examples (data.eval unset, data.eval_fraction="
            f"{rec.eval_fraction}); give --data with pairs it did not train on."
        )
    return {
        "data": rec.data,
        "max_length": rec.max_length,
        "columns": dict(rec.columns),
        "split": rec.split,
        "on_bad_record": rec.on_bad_record,
        "max_prompt_length": rec.max_prompt_length,
        "data_format": PAIR_RECIPES[rec.recipe],
        "heldout_sources": list(rec.sources),
        "heldout_record": path,
    }


def load_pairs(cfg: EvalConfig) -> list:
    """The preference pairs to evaluate: `data` read with the config's settings and, for a run, only
    the examples its heldout.json lists (an error names any that the file no longer holds)."""
    if cfg.data_format == "masked":
        from alignkit.data.masked import load_masked_examples as loader
    else:
        loader = load_preference_examples
    loaded = loader(cfg.data, columns=cfg.columns or None, on_bad_record=cfg.on_bad_record, split=cfg.split)
    if loaded.skipped:
        print(f"alignkit: {loaded.summary()}", flush=True)
    if cfg.data_format == "masked":  # the eval metrics are defined on whole completions
        print(
            "alignkit: sentence-labelled pairs: log-probs are summed over whole completions, not only the "
            "sentences Mask-DPO scored",
            flush=True,
        )
    if cfg.heldout_sources is None:
        return loaded.examples
    examples = select_sources(loaded.examples, cfg.heldout_sources, cfg.data, cfg.heldout_record)
    print(
        f"alignkit: evaluating the {len(examples)} pairs the run held out of {cfg.data} (listed in "
        f"{cfg.heldout_record})",
        flush=True,
    )
    return examples


def preference_section(cfg: EvalConfig, tokenizer, policy, reference, examples: list) -> tuple[dict, dict, dict]:
    """Pair metrics; also the length-bias section and the data the checkpoint pass reuses."""
    items, _ = tokenize_pairs(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)
    pad = tokenizer.pad_token_id
    pol = pair_tables(policy, items, pad, cfg.batch_size, cfg.parallel)
    len_c = torch.tensor([len(it.chosen_ids) for it in items], dtype=torch.float64)
    len_r = torch.tensor([len(it.rejected_ids) for it in items], dtype=torch.float64)
    out = {
        "ranking_accuracy": M.ranking_accuracy(pol[:, 0], pol[:, 1]),
        "ranking_accuracy_mean_logprob": M.ranking_accuracy(pol[:, 0] / len_c, pol[:, 1] / len_r),
    }
    bias_rewards, bias = None, None
    ref = None
    if reference is not None:
        ref = pair_tables(reference, items, pad, cfg.batch_size, cfg.parallel)
        rc, rr = cfg.beta * (pol[:, 0] - ref[:, 0]), cfg.beta * (pol[:, 1] - ref[:, 1])
        out["implicit_reward_accuracy"] = M.ranking_accuracy(rc, rr)
        mean, lo, hi = M.bootstrap_mean_ci((rc - rr).tolist())
        out["implicit_margin"] = {"value": mean, "ci95": [lo, hi], "n": len(items)}
        out["idealized_ranking_accuracy"] = M.idealized_ranking_accuracy(ref[:, 0], ref[:, 1], cfg.beta)
        out["likelihood_displacement"] = M.likelihood_displacement(ref[:, 0], pol[:, 0], ref[:, 1], pol[:, 1])
        bias_rewards, kind = (rc, rr), "implicit"
    if cfg.rewards:
        prompts = [list(e.prompt) for e in examples]
        sc = _score(cfg, prompts, [e.chosen[-1]["content"] for e in examples])
        sr = _score(cfg, prompts, [e.rejected[-1]["content"] for e in examples])
        out["reward_accuracy"] = M.ranking_accuracy(sc, sr)
        bias_rewards, kind = (torch.tensor(sc), torch.tensor(sr)), "reward_model"
        # a reward reads whole replies, where the policy's tables read them cut to max_length: its
        # bias is measured against the lengths it read (cut ones would put long replies at the cap)
        uncut = torch.tensor([it.reply_lengths for it in items], dtype=torch.float64).reshape(-1, 2)
        len_c, len_r = uncut[:, 0], uncut[:, 1]
    if bias_rewards is not None:
        bias = dict(M.length_bias(bias_rewards[0], bias_rewards[1], len_c, len_r), reward=kind)
    return out, bias, {"items": items, "ref": ref, "examples": examples}


def _score(cfg: EvalConfig, prompts: list, completions: list) -> list[float]:
    """The sum of the configured rewards (untransformed): used where no per-prompt reference exists."""
    return _sum_scores(_scores_by_reward(cfg, prompts, completions))


def _sum_scores(by_reward: dict) -> list[float]:
    return torch.tensor(list(by_reward.values()), dtype=torch.float64).sum(0).tolist()


def _scores_by_reward(cfg: EvalConfig, prompts: list, completions: list, columns: dict | None = None) -> dict:
    """{reward: one score per completion}; a completion with a reasoning block is scored on its
    answer, the block as the `reasoning` column (`score_ragged`, as in training)."""
    groups = [[c] for c in completions]
    return {
        f"{i}:{r!r}": [g[0] for g in score_ragged(r, prompts, groups, columns or {})[0]]
        for i, r in enumerate(cfg.rewards)
    }


def sample_logps(
    model, tokenizer, prompts: list, completions: list, max_length: int, batch_size: int, topk: bool = False
) -> tuple[torch.Tensor, dict | None]:
    """Summed log-probs of (prompt, completion) under `model`; with topk, also top-k statistics
    (arXiv 2410.11677) over the positions predicting completion tokens."""
    acc = {"mass": 0.0, "ent": 0.0, "n": 0}

    def gather(m, batch):
        stats = _topk_of_batch(m, batch)
        acc["mass"] += stats["topk_mass"] * stats["n_positions"]
        acc["ent"] += stats["topk_entropy"] * stats["n_positions"]
        acc["n"] += stats["n_positions"]

    out = passes.sample_logps(
        model, tokenizer, prompts, completions, max_length, batch_size, on_batch=gather if topk else None
    )
    stats = (
        {"topk_mass": acc["mass"] / max(1, acc["n"]), "topk_entropy": acc["ent"] / max(1, acc["n"])} if topk else None
    )
    return out, stats


def _topk_of_batch(model, batch: TokenBatch, k: int = 10) -> dict:
    h, _, _, head = scored_hidden(model, batch)
    logits = head(h)[None]  # [1, N, V]: the positions predicting completion tokens only
    return M.topk_stats(logits, torch.ones(logits.shape[:2], dtype=torch.bool), k=k)


def held_out_prompts(cfg: EvalConfig, examples: list) -> list:
    seen, prompts = set(), []
    for e in examples:
        key = json.dumps(e.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(list(e.prompt))
    return prompts[: cfg.num_prompts]


def _sample_texts(
    sampler, model, tokenizer, prompts: list, params, batch_size: int, seed: int, progress: bool, desc: str
) -> list:
    """One sampled reply per prompt: from `sampler` (a vLLM backend) when given, else alignkit's own."""
    if sampler is None:
        return [
            s[0]
            for s in generate(
                model, tokenizer, prompts, params, batch_size=batch_size, seed=seed, progress=progress, desc=desc
            )
        ]
    from alignkit.generation.hf import encode_prompts

    return [g[0].text for g in sampler.sample(encode_prompts(tokenizer, prompts), params.but(n=1), seed)]


def _replies_maker(cfg: EvalConfig, model, tokenizer, factory):
    """() -> (Replies, close) for the safety evaluation: a vLLM sampler from `factory` when given
    (closed after use unless it is the policy's own, which the command closes), else alignkit's
    own sampler over `model`."""

    def make():
        if factory is None:
            from alignkit.generation.backends import TransformersBackend

            backend, close = TransformersBackend(model, tokenizer, cfg.batch_size, cfg.progress), lambda: None
        else:
            backend = factory()
            close = (lambda: None) if factory is cfg.sampler else backend.close
        return (lambda ids, params, seed: [[x.text for x in g] for g in backend.sample(ids, params, seed)]), close

    return make


def generation_section(
    cfg: EvalConfig, tokenizer, policy, reference, prompts: list, ref_samples: list, sampler=None
) -> dict:
    """Win rate of policy samples over reference samples under the reward(s), and KL on policy samples."""
    samples = _sample_texts(
        sampler, policy, tokenizer, prompts, cfg.sampling, cfg.batch_size, cfg.seed, cfg.progress, "sampling (policy)"
    )
    pol_lp, topk = sample_logps(policy, tokenizer, prompts, samples, cfg.max_length, cfg.batch_size, topk=True)
    ref_lp, _ = sample_logps(reference, tokenizer, prompts, samples, cfg.max_length, cfg.batch_size)
    out = {
        "n_prompts": len(prompts),
        "kl": M.kl_estimate(pol_lp, ref_lp),
        "topk": topk,
        "examples": [
            {"prompt": _last_user(p), "policy": s, "reference": r, **_thumbnails(p, i)}
            for i, (p, s, r) in enumerate(list(zip(prompts, samples, ref_samples))[:5])
        ],
    }
    if cfg.rewards:
        pol_scores, ref_scores = combined_scores(cfg, prompts, samples, ref_samples)
        tokens = lambda texts: [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]  # noqa: E731
        pol_len, ref_len = tokens(samples), tokens(ref_samples)
        out.update(
            win_rate=M.win_rate(pol_scores, ref_scores),
            # the win rate a reply of the reference's length would get (AlpacaEval LC, arXiv 2404.04475)
            length_controlled_win_rate=M.length_controlled_win_rate(pol_scores, ref_scores, pol_len, ref_len),
            policy_length_mean=float(sum(pol_len) / max(1, len(pol_len))),
            reference_length_mean=float(sum(ref_len) / max(1, len(ref_len))),
            scorer=", ".join(repr(r) for r in cfg.rewards),
            policy_reward_mean=float(torch.tensor(pol_scores).mean()),
            reference_reward_mean=float(torch.tensor(ref_scores).mean()),
        )
    return out


def best_of_n_section(
    cfg: EvalConfig, tokenizer, policy, reference, prompts: list, columns: dict | None = None
) -> dict:
    """Best-of-n win rates against the reference (InfAlign, arXiv 2412.19792; see
    `rewards.calibration` for what is read from the paper and what is derived): per prompt,
    `calibration_k` samples of the policy, of the reference, and a second, held-out set of the
    reference; the policy's best-of-n against one reference sample and against the reference's
    best-of-n (and worst-of-n against worst-of-n), ties half, in closed form from the empirical
    rewards (`calibration.selection_win_rate`); averaged over prompts with a bootstrap interval. The
    reference's own rows are the held-out reference samples measured the same way (1/2 against its
    best-of-n in expectation, whatever the reward's ties)."""
    from alignkit.rewards import calibration as C

    if not prompts:
        raise ConfigError("--bon-n needs prompts: give --prompts or --data.")
    k = cfg.calibration_k
    if k < max(cfg.bon_n):
        raise ConfigError(
            f"--bon-n {max(cfg.bon_n)} draws {max(cfg.bon_n)} distinct samples of the --calibration-k "
            f"{k} per prompt: raise --calibration-k to at least {max(cfg.bon_n)}."
        )
    params = cfg.sampling.but(n=k)
    flat_prompts = [p for p in prompts for _ in range(k)]
    flat_cols = {key: [v for v in vals for _ in range(k)] for key, vals in (columns or {}).items()}
    rewards = {}
    for name, model, seed in (("reference", reference, 2), ("policy", policy, 3), ("reference_heldout", reference, 4)):
        groups = generate(
            model,
            tokenizer,
            prompts,
            params,
            batch_size=cfg.batch_size,
            seed=cfg.seed + seed,
            progress=cfg.progress,
            desc=f"best-of-n: {name.replace('_', ' ')} samples",
        )
        flat = _sum_scores(_scores_by_reward(cfg, flat_prompts, [s for g in groups for s in g], flat_cols))
        rewards[name] = [[float(x) for x in flat[i * k : (i + 1) * k]] for i in range(len(prompts))]
    ref = rewards["reference"]
    calibrated = [C.calibrate(p, [r] * k) for p, r in zip(rewards["policy"], ref)]
    out = {
        "calibration_k": k,
        "n_prompts": len(prompts),
        "ties": "half",
        "policy_calibrated_mean": sum(map(sum, calibrated)) / (k * len(prompts)),
        "by_n": {},
        "rewards": rewards,
    }  # per prompt, the K samples' rewards of each side: every rate can be recomputed

    def rate(side: str, n: int, n_ref: int, which: str) -> dict:
        values = [C.selection_win_rate(p, r, n, n_ref, which) for p, r in zip(rewards[side], ref)]
        m, lo, hi = M.bootstrap_mean_ci(values)
        return {"value": m, "ci95": [lo, hi]}

    for n in cfg.bon_n:
        n = int(n)
        out["by_n"][str(n)] = {
            "vs_reference_sample": rate("policy", n, 1, "max"),
            "vs_reference_best_of_n": rate("policy", n, n, "max"),
            "worst_vs_reference_worst_of_n": rate("policy", n, n, "min"),
            "reference_vs_reference_sample": rate("reference_heldout", n, 1, "max"),
            "reference_vs_reference_best_of_n": rate("reference_heldout", n, n, "max"),
            "reference_worst_vs_reference_worst_of_n": rate("reference_heldout", n, n, "min"),
        }
    return out


def combined_scores(cfg: EvalConfig, prompts: list, samples: list, ref_samples: list) -> tuple[list, list]:
    """Scores of policy and reference samples. With `log_sigmoid`, each reward is measured against
    the reference sample's reward for the same prompt and the transformed rewards are summed
    (arXiv 2402.00742); a reference sample then scores n * log(1/2) exactly."""
    pol = _scores_by_reward(cfg, prompts, samples)
    ref = _scores_by_reward(cfg, prompts, ref_samples)
    if cfg.reward_transform == "log_sigmoid":
        return combine_log_sigmoid(pol, ref), combine_log_sigmoid(ref, ref)
    return _sum_scores(pol), _sum_scores(ref)


def _last_user(prompt) -> str:
    users = [text_of(m["content"]) for m in prompt if m["role"] == "user"]
    return users[-1] if users else str(prompt)


def _thumbnails(prompt, index: int) -> dict:
    """The prompt's images as small data URIs, which the report shows beside the samples."""
    if isinstance(prompt, str) or not has_images(prompt):
        return {}
    return {"images": [thumbnail_uri(ref, f"prompt {index}") for ref in prompt_images(prompt)]}


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint-N and final/ of a run, in step order."""
    found = []
    for d in Path(run_dir).iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and (d / "config.json").is_file():
            found.append((int(m.group(1)), d))
    final = Path(run_dir) / "final"
    summary = Path(run_dir) / "summary.json"
    if (final / "config.json").is_file():
        step = (
            json.loads(summary.read_text())["steps"]
            if summary.is_file()
            else (max(s for s, _ in found) + 1 if found else 0)
        )
        if step not in {s for s, _ in found}:
            found.append((step, final))
    return sorted(found)


def checkpoints_section(
    cfg: EvalConfig, models: _Models, tokenizer, reference, prompts, ref_samples, pair_data
) -> list[dict]:
    rows = []
    checkpoints = list_checkpoints(Path(cfg.checkpoints))
    for step, path in tqdm(checkpoints, desc="checkpoints", disable=not cfg.progress):
        model = models.load(str(path))
        row = {"step": step, "path": str(path)}
        if prompts:
            gen = generation_section(cfg, tokenizer, model, reference, prompts, ref_samples)
            row.update(
                kl=gen["kl"]["value"],
                topk_entropy=gen["topk"]["topk_entropy"],
                topk_mass=gen["topk"]["topk_mass"],
                win_rate=gen.get("win_rate"),
                reward=gen.get("policy_reward_mean"),
            )
        if pair_data and pair_data["ref"] is not None:
            pol = pair_tables(model, pair_data["items"], tokenizer.pad_token_id, cfg.batch_size, cfg.parallel)
            disp = M.likelihood_displacement(pair_data["ref"][:, 0], pol[:, 0], pair_data["ref"][:, 1], pol[:, 1])
            row.update(
                chosen_logp_change=disp["chosen_logp_change"],
                chosen_logp_down_fraction=disp["chosen_logp_down_fraction"],
                rejected_logp_change=disp["rejected_logp_change"],
            )
        rows.append(row)
        del model
    return rows


def strategy_section(cfg: EvalConfig, tokenizer, model, prompts: list, columns: dict) -> dict:
    """The strategy and plain sampling on the same prompts: reward, win rate, KL, cost."""
    import dataclasses

    from alignkit.inference.strategies import StrategyOptions, run_strategy
    from alignkit.rewards.verifiable import WeightedSum

    reward = cfg.rewards[0] if len(cfg.rewards) == 1 else WeightedSum([(r, 1.0) for r in cfg.rewards])
    options = cfg.strategy_options or StrategyOptions()
    common = dict(
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
        sampler=cfg.sampler() if cfg.sampler is not None else None,
    )
    base = run_strategy("sample", model, tokenizer, reward, prompts, columns, cfg.sampling, options, **common)
    res = run_strategy(cfg.strategy, model, tokenizer, reward, prompts, columns, cfg.sampling, options, **common)
    mine, theirs = [c.reward for c in res.choices], [c.reward for c in base.choices]
    mean, lo, hi = M.bootstrap_mean_ci(mine)
    bmean, blo, bhi = M.bootstrap_mean_ci(theirs)
    ratio = lambda a, b: a / b if b else None
    return {
        "strategy": cfg.strategy,
        "options": dataclasses.asdict(options),
        "n_prompts": len(prompts),
        "scorer": repr(reward),
        "reward": {"value": mean, "ci95": [lo, hi], "n": len(mine)},
        "sampling_reward": {"value": bmean, "ci95": [blo, bhi], "n": len(theirs)},
        "win_rate_vs_sampling": M.win_rate(mine, theirs),
        "kl": {"value": res.kl, "kind": res.kl_kind},
        "cost": {
            "seconds": res.seconds,
            "new_tokens": res.new_tokens,
            "prompt_tokens": res.prompt_tokens,
            "seconds_vs_sampling": ratio(res.seconds, base.seconds),
            "new_tokens_vs_sampling": ratio(res.new_tokens, base.new_tokens),
            "prompt_tokens_vs_sampling": ratio(res.prompt_tokens, base.prompt_tokens),
        },
        "summary": res.summary(),
        "sampling_summary": base.summary(),
        "examples": [
            {
                "prompt": _last_user(p) if not isinstance(p, str) else p,
                "strategy": c.completion,
                "sampling": b.completion,
                "reward": c.reward,
                "sampling_reward": b.reward,
            }
            for p, c, b in list(zip(prompts, res.choices, base.choices))[:5]
        ],
    }


def run_eval(cfg: EvalConfig) -> dict:
    """Run every part whose inputs are given; write metrics.json (and return it)."""
    if not cfg.data and not cfg.checkpoints and not cfg.rewards and not cfg.steer_sweep and cfg.safety is None:
        raise ConfigError(
            "nothing to evaluate: give --data (preference pairs), --reward, --checkpoints, --steer-sweep or --safety."
        )
    if cfg.strategy and not cfg.rewards:
        raise ConfigError(f"--strategy {cfg.strategy} is judged by a reward: give --reward.")
    if cfg.strategy and not (cfg.prompts or cfg.data):
        raise ConfigError(f"--strategy {cfg.strategy} needs prompts: give --prompts (prompt records) or --data.")
    if cfg.representation_layers and not cfg.data:
        raise ConfigError("--representation-layers reads preference pairs: give --data.")
    if cfg.steer_sweep and not cfg.steer:
        raise ConfigError("--steer-sweep needs --steer DIR (the vectors to sweep).")
    if cfg.steer_sweep and not (cfg.behaviour_prompts or cfg.accuracy or cfg.data or cfg.helpfulness):
        raise ConfigError(
            "--steer-sweep needs something to measure: --behaviour-prompts (harmful prompts: refusal "
            "minus compliance of sampled replies) and --accuracy (questions with known answers), as "
            "Wolf et al. measure; --data (the pairs' log-prob margin) and --helpfulness (reference "
            "answers' NLL) as secondary diagnostics."
        )
    for key in ("behaviour_prompts", "behaviour_judge", "accuracy", "helpfulness"):
        if getattr(cfg, key) and not cfg.steer_sweep:
            raise ConfigError(f"--{key.replace('_', '-')} has no effect without --steer-sweep.")
    if cfg.steer_norm != "relative" and not cfg.steer_sweep:
        raise ConfigError("--steer-norm has no effect without --steer-sweep.")
    examples = load_pairs(cfg) if cfg.data else None  # data errors before any model loads
    models = _Models(cfg)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=cfg.model), cfg.cache_dir)
    policy = models.load(cfg.model)
    with contextlib.ExitStack() as stack:
        if cfg.steer and not cfg.steer_sweep:  # every part of the evaluation sees the steered policy
            from alignkit.inference.steering import load_vectors, steer

            vectors, _ = load_vectors(cfg.steer, policy)
            stack.enter_context(steer(policy, vectors, cfg.steer_strength, cfg.steer_positions))
        result = _run_parts(cfg, models, tokenizer, policy, examples)
    if cfg.parallel is None or cfg.parallel.is_main:
        write_json(Path(cfg.output_dir) / "metrics.json", result)
    return result


def _run_parts(cfg: EvalConfig, models, tokenizer, policy, examples) -> dict:
    reference = models.load(cfg.reference) if cfg.reference else None
    result = {
        "alignkit_eval": 1,
        "model": cfg.model,
        "reference": cfg.reference,
        "data": cfg.data,
        "beta": cfg.beta,
        "date": datetime.date.today().isoformat(),
    }
    pair_data, prompts, ref_samples = None, [], []
    if cfg.data:
        pref, bias, pair_data = preference_section(cfg, tokenizer, policy, reference, examples)
        result.update(
            n_pairs=len(pair_data["items"]),
            pair_sources=[e.source for e in examples],
            max_length=cfg.max_length,
            heldout_record=cfg.heldout_record,
            preference=pref,
        )
        if bias is not None:
            result["length_bias"] = bias
        if reference is not None:
            prompts = held_out_prompts(cfg, pair_data["examples"])
    if prompts:
        ref_sampler = cfg.reference_sampler() if cfg.reference_sampler is not None else None
        ref_samples = _sample_texts(
            ref_sampler,
            reference,
            tokenizer,
            prompts,
            cfg.sampling,
            cfg.batch_size,
            cfg.seed + 1,
            cfg.progress,
            "sampling (reference)",
        )
        if ref_sampler is not None and cfg.reference_sampler is not cfg.sampler:
            ref_sampler.close()  # one engine at a time (the same weights share one)
        result["generation"] = generation_section(
            cfg, tokenizer, policy, reference, prompts, ref_samples, cfg.sampler() if cfg.sampler is not None else None
        )
    if cfg.checkpoints:
        if reference is None:
            raise ConfigError("--checkpoints needs a reference model (--reference) to measure drift from.")
        result["checkpoints"] = checkpoints_section(cfg, models, tokenizer, reference, prompts, ref_samples, pair_data)
    if cfg.strategy:
        if cfg.prompts:
            from alignkit.data.prompts import load_prompt_examples, prompt_columns

            records = load_prompt_examples(cfg.prompts).examples[: cfg.num_prompts]
            s_prompts, columns = [list(e.prompt) for e in records], prompt_columns(records)
        else:
            s_prompts, columns = prompts or held_out_prompts(cfg, examples), {}
        result["strategy"] = strategy_section(cfg, tokenizer, policy, s_prompts, columns)
    if cfg.bon_n:
        if reference is None or not cfg.rewards:
            raise ConfigError(
                "--bon-n compares best-of-n from the policy with the reference under a reward: give "
                "--reference and --reward."
            )
        if cfg.prompts:
            from alignkit.data.prompts import load_prompt_examples, prompt_columns

            records = load_prompt_examples(cfg.prompts).examples[: cfg.num_prompts]
            bon_prompts, bon_columns = [list(e.prompt) for e in records], prompt_columns(records)
        else:
            bon_prompts, bon_columns = prompts or (held_out_prompts(cfg, examples) if examples else []), {}
        result["best_of_n"] = best_of_n_section(cfg, tokenizer, policy, reference, bon_prompts, bon_columns)
    if cfg.steer:
        result["steer"] = {"vectors": cfg.steer, "strength": cfg.steer_strength, "positions": cfg.steer_positions}
    if cfg.steer_sweep:
        from alignkit.data.formats import load_sft_examples
        from alignkit.data.prompts import load_prompt_examples
        from alignkit.eval.steering import load_questions, steering_sweep
        from alignkit.rewards.refusal import make_judge

        helpful = []
        if cfg.helpfulness:
            loaded_help = load_sft_examples(cfg.helpfulness, on_bad_record=cfg.on_bad_record)
            if loaded_help.skipped:
                print(f"alignkit: --helpfulness: {loaded_help.summary()}", flush=True)
            helpful = loaded_help.examples[: cfg.num_prompts]
        harmful = (
            [list(e.prompt) for e in load_prompt_examples(cfg.behaviour_prompts).examples[: cfg.num_prompts]]
            if cfg.behaviour_prompts
            else None
        )
        result["steering"] = steering_sweep(
            policy,
            tokenizer,
            cfg.steer,
            cfg.steer_sweep,
            norm=cfg.steer_norm,
            behaviour_prompts=harmful,
            judge=make_judge(cfg.behaviour_judge),
            pairs=examples or None,
            questions=load_questions(cfg.accuracy, cfg.num_prompts) if cfg.accuracy else None,
            help_prompts=[list(e.prompt) for e in helpful] or None,
            help_answers=["\n".join(m["content"] for m in e.completion) for e in helpful] or None,
            params=cfg.sampling,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            positions=cfg.steer_positions,
            seed=cfg.seed,
            progress=cfg.progress,
        )
    if cfg.safety is not None:
        from alignkit.eval.safety_inputs import safety_section

        result["safety"] = safety_section(
            cfg.safety,
            tokenizer,
            _replies_maker(cfg, policy, tokenizer, cfg.sampler),
            _replies_maker(cfg, reference, tokenizer, cfg.reference_sampler) if reference is not None else None,
        )
    if cfg.representation_layers:
        from alignkit.eval.steering import representation_section

        result["representation"] = representation_section(
            policy, tokenizer, examples, cfg.representation_layers, cfg.batch_size
        )
    return result


def write_json(path: Path, obj) -> None:
    """metrics.json as strict JSON (a NaN, e.g. a KL over no samples, becomes null), atomically."""
    jsonfile.write_atomic(path, obj)
