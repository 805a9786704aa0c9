"""Multi-turn episodes on the KV cache (issue 18): continuing from the cache gives the log-probs a
full forward over the whole episode gives, environment tokens are the template's and unmasked
only for the model's own tokens, and the turn and token limits end episodes."""

import pytest
import torch

from alignkit.envs import StepResult
from alignkit.generation.decode import SamplingParams
from alignkit.generation.multiturn import observation_ids, render, sample_episodes
from alignkit.testing import tiny_model, tiny_tokenizer


class Countdown:
    """Replies with a tool message for `tool_turns` turns, then ends the episode with reward 1."""

    def __init__(self, tool_turns: int):
        self.left = tool_turns

    def step(self, message):
        if self.left == 0:
            return StepResult([], 1.0, True)
        self.left -= 1
        return StepResult([{"role": "tool", "content": f"yes {self.left} no"}], 0.25, False)


def _setup():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok), hidden=32).eval()
    return tok, model


def test_episodes_continue_from_the_cache_exactly():
    tok, model = _setup()
    firsts = [
        [{"role": "user", "content": "what is one plus one ?"}],
        [{"role": "user", "content": "yes"}],
        [{"role": "user", "content": "no no no yes"}],
    ]
    envs = [Countdown(2), Countdown(1), Countdown(5)]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    eps = sample_episodes(
        model,
        tok,
        envs,
        firsts,
        SamplingParams(max_new_tokens=5, temperature=1.0),
        max_turns=4,
        max_tokens=200,
        generator=gens,
    )
    assert [e.end for e in eps] == ["answer", "answer", "turn_limit"]
    assert [e.turns for e in eps] == [3, 2, 4] and [e.reward for e in eps] == [1.5, 1.25, 1.0]
    for ep in eps:
        assert sum(ep.model_mask) == len(ep.logprobs) and len(ep.model_mask) == len(ep.token_ids)
        full = torch.tensor([ep.prompt_ids + ep.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(full).logits[0].float(), -1)
        start = len(ep.prompt_ids)
        scored = [float(logp[start + j - 1, t]) for j, (t, m) in enumerate(zip(ep.token_ids, ep.model_mask)) if m]
        assert scored == pytest.approx(ep.logprobs, abs=1e-5)  # the cache saw exactly this sequence
        # between turns: the template's own rendering of each tool message, then the next assistant header
        header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        tools = [
            tok(render(tok, [m]), add_special_tokens=False)["input_ids"] for m in ep.messages if m["role"] == "tool"
        ]
        env_runs, run = [], []
        for t, m in zip(ep.token_ids, ep.model_mask):
            if not m:
                run.append(t)
            elif run:
                env_runs.append(run)
                run = []
        assert len(env_runs) == len(tools) == ep.turns - 1  # an observation after every turn but the last
        for r, tool_ids in zip(env_runs, tools):
            assert r[-len(header) :] == header and r[-len(header) - len(tool_ids) : -len(header)] == tool_ids


def test_processed_episode_logprobs_are_those_of_the_sampling_distribution():
    """With `logprobs="processed"` (online training), a model token's log-prob is under the
    distribution it was drawn from (temperature, top-k, top-p: `sampling_scores`), which a full
    forward over the whole episode gives back; and it is not the raw one."""
    from alignkit.logprobs import sampling_scores

    tok, model = _setup()
    params = SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=20, logprobs="processed")
    firsts = [[{"role": "user", "content": "what is one plus one ?"}], [{"role": "user", "content": "yes"}]]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    envs = [Countdown(2), Countdown(1)]
    eps = sample_episodes(model, tok, envs, firsts, params, max_turns=3, max_tokens=200, generator=gens)
    for ep in eps:
        with torch.no_grad():
            logits = model(torch.tensor([ep.prompt_ids + ep.token_ids])).logits[0].float()
        x = sampling_scores(logits, params)
        processed = x - torch.logsumexp(x, -1, keepdim=True)
        raw = torch.log_softmax(logits, -1)
        at = [(len(ep.prompt_ids) + j - 1, t) for j, (t, m) in enumerate(zip(ep.token_ids, ep.model_mask)) if m]
        assert len(at) > 5 and [float(processed[i, t]) for i, t in at] == pytest.approx(ep.logprobs, abs=1e-5)
        assert min(abs(float(raw[i, t]) - lp) for (i, t), lp in zip(at, ep.logprobs)) > 0.05


def test_token_budget_ends_an_episode():
    tok, model = _setup()
    eps = sample_episodes(
        model,
        tok,
        [Countdown(10)],
        [[{"role": "user", "content": "yes"}]],
        SamplingParams(max_new_tokens=6, temperature=1.0),
        max_turns=10,
        max_tokens=20,
        generator=torch.Generator().manual_seed(0),
    )
    assert eps[0].end == "token_limit" and len(eps[0].token_ids) <= 20


def test_observation_ids_keep_what_follows_the_end_of_turn_token():
    tok, _ = _setup()
    convo = [{"role": "user", "content": "yes"}, {"role": "assistant", "content": "no"}]
    new = [{"role": "tool", "content": "yes"}]
    after_eos = tok.decode(observation_ids(tok, convo, new, ended_by_eos=True), skip_special_tokens=False)
    cut = tok.decode(observation_ids(tok, convo, new, ended_by_eos=False), skip_special_tokens=False)
    assert "<|im_end|>" in cut and cut.count("<|im_end|>") == after_eos.count("<|im_end|>") + 1


def test_episode_metrics_with_the_calculator_environment():
    from alignkit.envs import load_environment_class
    from alignkit.generation.multiturn import Episode, episode_metrics

    envs = [load_environment_class("calculator")() for _ in range(2)]
    envs[0].reset({"prompt": "2+3?", "answer": "5"})
    envs[0].step(
        {
            "role": "assistant",
            "content": '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}'
            "</tool_call><tool_call>oops</tool_call>",
        }
    )
    envs[1].reset({"prompt": "1+1?", "answer": "2"})
    eps = [
        Episode([1], turns=2, end="answer", turn_rewards=[0.0, 1.0], counts=dict(envs[0].counts)),
        Episode([1], turns=3, end="turn_limit", turn_rewards=[0.0, 0.0, 0.0], counts=dict(envs[1].counts)),
    ]
    m = episode_metrics(eps)
    assert m == {
        "episode/turns": 2.5,
        "episode/reward_per_turn": 0.2,
        "episode/ended_answer": 0.5,
        "episode/ended_turn_limit": 0.5,
        "episode/ended_token_limit": 0.0,
        "episode/tool_calls": 1.0,
        "episode/tool_errors": 0.5,
    }


def test_a_prompts_episodes_share_its_prefill_and_sample_the_same():
    tok, model = _setup()
    firsts = [[{"role": "user", "content": "yes no"}]] * 2 + [[{"role": "user", "content": "one plus one"}]] * 2
    runs = []
    for group_size in (1, 2):
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        runs.append(
            sample_episodes(
                model,
                tok,
                [Countdown(1) for _ in range(4)],
                firsts,
                SamplingParams(max_new_tokens=4, temperature=1.0),
                max_turns=3,
                max_tokens=100,
                generator=gens,
                group_size=group_size,
            )
        )
    for a, b in zip(*runs):
        assert a.token_ids == b.token_ids and a.model_mask == b.model_mask
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


class Scripted:
    """A token-in, token-out backend that answers each turn with fixed tokens, per-token versions
    and log-probs, and records the `min_version` every request named."""

    def __init__(self, tok, turns: list):
        self.eos = tok.convert_tokens_to_ids("<|im_end|>")
        self.turns, self.asked = list(turns), []

    def sample(self, prompts, params, seed, prompt_seeds=None, min_version=0):
        from alignkit.generation.decode import Sample

        self.asked.append(min_version)
        ids, mask, versions = self.turns.pop(0)
        ids = ids + [self.eos]
        mask, versions = (mask + [True] if mask else None), (versions + [versions[-1]] if versions else None)
        logprobs = [-0.5 - i for i, m in enumerate(mask or [True] * len(ids)) if m]
        return [[Sample(ids, logprobs, "stop", "", mask=mask, versions=versions)] for _ in prompts]


def test_served_episodes_name_their_version_and_record_each_model_tokens():
    """An asynchronous run's episode on a server: every turn asks for the run's version, and each
    model token records the version that sampled it: the server's label (a weight update mid-turn
    is a partial rollout), or the version asked for where the server gives none; a thinking
    budget's forced tokens (mask False) have no log-prob and no version."""
    from alignkit.generation.multiturn import sample_episodes_on

    tok, _ = _setup()
    a, b, forced = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no", "one"))
    backend = Scripted(tok, [([a, forced, b], [True, False, True], [3, 3, 4]), ([b, a], None, None)])
    (ep,) = sample_episodes_on(
        backend,
        tok,
        [Countdown(1)],
        [[{"role": "user", "content": "yes"}]],
        SamplingParams(max_new_tokens=8, temperature=1.0),
        max_turns=3,
        max_tokens=200,
        seeds=[0],
        min_version=3,
    )
    assert backend.asked == [3, 3] and ep.turns == 2 and ep.end == "answer"
    assert len(ep.versions) == len(ep.logprobs) == sum(ep.model_mask) == 6
    assert ep.versions == [3, 4, 4, 3, 3, 3]  # turn 1 labelled by the server, turn 2 the version asked
    assert ep.logprobs == [-0.5, -2.5, -3.5, -0.5, -1.5, -2.5]
