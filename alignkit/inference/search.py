"""Reward-guided search over blocks of tokens: DeAL and Transfer Q*.

DeAL (Huang et al. 2024, arXiv 2402.06147) treats decoding as a heuristic-guided tree search: a
node is a partial completion, its children are continuations proposed by the model, and a
heuristic scores each child by looking ahead, i.e. by scoring the child extended by a few more
tokens. A child's lookahead is kept as one of its proposals for the next step, so a continuation
the heuristic liked can be committed instead of being sampled again. The heuristic is any alignkit reward:
programmatic constraints (keywords, length) or a
reward model. Here a step commits `block` tokens (`block=1` is the token-level search of the
paper; larger blocks cut the number of reward calls):

    for each node in the beam:  k children = k samples of block + lookahead tokens (one prefill)
    heuristic(child) = reward(prompt, child's block-extended text + its lookahead tokens)
    beam = the `beam` best children (finished nodes compete with their final reward)

and the answer is the finished node with the highest reward on its own text.

Transfer Q* (Chakraborty et al. 2024, arXiv 2405.20495) guides the model with the value of a
candidate, Q*(s, z) = r(x, [y, z, tau]) where tau is a continuation drawn from a baseline model
already aligned to the target reward; it picks the candidate with the highest Q. It is the same
search with a beam of one, whose lookahead comes from the baseline model instead of the model
itself (greedy, up to `horizon` tokens).

Cost: a node's children share one prefill of its prefix; prefixes are prefilled again at each
step (no cache is kept between steps), which `prompt_tokens` counts. KL: a committed block is one
of k samples from the model given its parent, so the answer is at most k^steps times as likely
under the search as under sampling; the reported bound is the mean of steps * log k.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from alignkit.generation.decode import SamplingParams, sample_batch, stopped_by_string
from alignkit.inference.result import Choice, StrategyResult
from alignkit.rewards.functions import score_ragged


@dataclass
class SearchParams:
    beam: int = 2  # partial completions kept per prompt
    candidates: int = 4  # children sampled per node (k)
    block: int = 8  # tokens committed per step
    lookahead: int = 16  # extra tokens the heuristic sees (model's own samples)
    baseline: object | None = None  # Transfer Q*: the aligned model whose continuation the reward scores
    horizon: int = 32  # Transfer Q*: tokens of the baseline's continuation


@dataclass
class _Node:
    tokens: list
    done: bool = False
    score: float = float("-inf")
    logp: float = 0.0
    steps: int = 0  # sampled decisions taken on the way here
    plan: tuple = ((), ())  # (tokens, log-probs) of the lookahead sampled after this node: a proposal for its next step


class _Counter:
    def __init__(self, n_prompts: int):
        self.prompt_tokens, self.new_tokens = 0, [0] * n_prompts


def _sample(model, prompts: list, params: SamplingParams, tokenizer, generator, counter, owners: list):
    """sample_batch with cost accounting: prefill tokens once per prompt row, and new tokens
    charged to the prompt (owner) each row belongs to."""
    out = sample_batch(
        model,
        prompts,
        params,
        eos_ids=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        generator=generator,
        tokenizer=tokenizer,
    )
    counter.prompt_tokens += sum(len(p) for p in prompts)
    for owner, group in zip(owners, out):
        counter.new_tokens[owner] += sum(len(s.token_ids) for s in group)
    return out


def _ends(tokens: list, tokenizer, stop: tuple) -> bool:
    if tokens and tokens[-1] == tokenizer.eos_token_id:
        return True
    return bool(stop) and stopped_by_string(tokenizer, tokens, stop)


def _text(tokenizer, tokens: list) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _search_batch(
    model,
    tokenizer,
    reward,
    prompts,
    prompt_ids,
    columns,
    params: SamplingParams,
    sp: SearchParams,
    generator,
    counter,
    offset: int,
) -> list[list[_Node]]:
    beams = [[_Node([])] for _ in prompt_ids]
    k = sp.candidates
    for _ in range(math.ceil(params.max_new_tokens / sp.block)):
        active = [(i, node) for i, beam in enumerate(beams) for node in beam if not node.done]
        if not active:
            break
        committed = min(sp.block, params.max_new_tokens - len(active[0][1].tokens))
        ahead = (
            0
            if sp.baseline is not None
            else min(sp.lookahead, params.max_new_tokens - len(active[0][1].tokens) - committed)
        )
        # A node's lookahead is itself a sample from the model given the node, so it is kept as
        # one of the node's k proposals at the next step: what the heuristic saw ahead can then be
        # committed rather than lost (a fresh sample would rarely repeat it).
        # (Only a plan that covers the whole block, or ends the reply, keeps every node at the same length.)
        usable = [
            k > 1 and (len(n.plan[0]) >= committed or _ends(list(n.plan[0]), tokenizer, params.stop)) for _, n in active
        ]
        fresh = k - 1 if any(usable) else k  # with no plan to offer, a node's k proposals are all fresh
        groups = [[] for _ in active]
        if fresh:
            sampling = params.but(max_new_tokens=committed + ahead, n=fresh)
            groups = _sample(
                model,
                [prompt_ids[i] + node.tokens for i, node in active],
                sampling,
                tokenizer,
                generator,
                counter,
                [offset + i for i, _ in active],
            )
        children = [[node for node in beam if node.done] for beam in beams]  # finished nodes compete on
        scored = [[] for _ in beams]  # (child, token ids the heuristic reads)
        for (i, node), group, own in zip(active, groups, usable):
            proposals = [(s.token_ids, s.logprobs) for s in group] + ([node.plan] if own else [])
            for ids, lps in proposals:
                block = list(ids[:committed])
                cut = next((j + 1 for j in range(len(block)) if _ends(block[: j + 1], tokenizer, params.stop)), None)
                block = block[:cut] if cut else block
                done = cut is not None or len(node.tokens) + len(block) >= params.max_new_tokens
                plan = ((), ()) if done else (tuple(ids[committed:]), tuple(lps[committed:]))
                child = _Node(
                    node.tokens + block, done, logp=node.logp + sum(lps[: len(block)]), steps=node.steps + 1, plan=plan
                )
                scored[i].append((child, child.tokens + list(plan[0])))
        if sp.baseline is not None:  # Transfer Q*: the aligned baseline continues each unfinished child
            todo = [(i, j) for i, group in enumerate(scored) for j, (c, _) in enumerate(group) if not c.done]
            if todo:
                horizon = min(sp.horizon, params.max_new_tokens)
                rolled = _sample(
                    sp.baseline,
                    [prompt_ids[i] + scored[i][j][0].tokens for i, j in todo],
                    params.but(max_new_tokens=horizon, temperature=0.0, n=1),
                    tokenizer,
                    generator,
                    counter,
                    [offset + i for i, _ in todo],
                )
                for (i, j), (roll,) in zip(todo, rolled):
                    child, _ = scored[i][j]
                    scored[i][j] = (child, child.tokens + roll.token_ids)
        values, _ = score_ragged(
            reward, prompts, [[_text(tokenizer, t) for _, t in group] for group in scored], columns
        )
        for i, (group, vals) in enumerate(zip(scored, values)):
            for (child, _), v in zip(group, vals):
                child.score = v
            pool = children[i] + [c for c, _ in group]
            beams[i] = sorted(pool, key=lambda c: (c.score, c.logp), reverse=True)[: sp.beam]
    return beams


def block_search(
    model,
    tokenizer,
    reward,
    prompts: list,
    prompt_ids: list,
    columns: dict,
    params: SamplingParams,
    sp: SearchParams,
    *,
    seed: int = 0,
    batch_size: int = 8,
    strategy: str = "deal",
    progress: bool = False,
) -> StrategyResult:
    """Search each prompt's completion (see the module docstring); prompts are searched
    `batch_size` at a time, every node of every prompt's beam expanded in one batched call."""
    if sp.beam < 1 or sp.candidates < 1 or sp.block < 1:
        raise ValueError(f"search needs beam, candidates and block >= 1; got {sp.beam}, {sp.candidates}, {sp.block}")
    start = time.perf_counter()
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    counter = _Counter(len(prompts))
    was = [(m, m.training) for m in (model, sp.baseline) if m is not None]
    for m, _ in was:
        m.eval()
    choices = []
    try:
        for b in tqdm(
            range(0, len(prompts), batch_size), desc=strategy, unit="batch", disable=not progress, leave=False
        ):
            sl = slice(b, b + batch_size)
            beams = _search_batch(
                model,
                tokenizer,
                reward,
                prompts[sl],
                prompt_ids[sl],
                {k: v[sl] for k, v in columns.items()},
                params,
                sp,
                generator,
                counter,
                b,
            )
            texts = [[_text(tokenizer, n.tokens) for n in beam] for beam in beams]
            finals, _ = score_ragged(reward, prompts[sl], texts, {k: v[sl] for k, v in columns.items()})
            for i, (beam, group, vals) in enumerate(zip(beams, texts, finals)):
                best = max(range(len(vals)), key=lambda j: vals[j])
                choices.append(
                    Choice(
                        group[best],
                        vals[best],
                        group,
                        vals,
                        best,
                        counter.new_tokens[b + i],
                        kl=beam[best].steps * math.log(sp.candidates),
                    )
                )
    finally:
        for m, mode in was:
            m.train(mode)
    info = {"beam": sp.beam, "candidates": sp.candidates, "block": sp.block}
    info.update({"horizon": sp.horizon} if sp.baseline is not None else {"lookahead": sp.lookahead})
    kl = sum(c.kl for c in choices) / max(1, len(choices))
    return StrategyResult(strategy, choices, time.perf_counter() - start, counter.prompt_tokens, kl, "bound", info)
