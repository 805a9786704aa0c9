"""Reasoning models (issue 32): replies split into reasoning and answer, `data.thinking` for offline
data, multi-turn episodes under templates that rewrite history (the trainer scores exactly the
sampler's tokens), the thinking budget, and the format reward."""

import pytest
import torch

from alignkit.data.reasoning import apply_thinking, reasoning_span, split_reasoning
from alignkit.envs import StepResult
from alignkit.errors import ConfigError
from alignkit.generation.decode import SamplingParams, Thinking, sample_batch, thinking_params
from alignkit.generation.multiturn import TemplateError, render, sample_episodes, template_kind
from alignkit.rewards.build import build_reward
from alignkit.rewards.functions import score_groups
from alignkit.testing import REASONING_TEMPLATES, reasoning_tokenizer, tiny_model

TAGS = ("<think>", "</think>")


def test_split_reasoning_reads_every_shape_of_reply():
    r = split_reasoning("<think> add them </think> 42")
    assert (r.reasoning, r.answer, r.closed, r.well_formed) == ("add them", "42", True, True)
    opened_in_prompt = split_reasoning("add them</think>42")  # DeepSeek-R1: the prompt opened the block
    assert (opened_in_prompt.reasoning, opened_in_prompt.answer) == ("add them", "42")
    cut = split_reasoning("<think> add them and")  # cut by a length limit: all reasoning, no answer
    assert (cut.reasoning, cut.answer, cut.closed, cut.well_formed) == ("add them and", "", False, False)
    plain = split_reasoning("just 42")
    assert (plain.reasoning, plain.answer, plain.well_formed) == (None, "just 42", False)
    twice = split_reasoning("<think>a</think>b<think>c</think>d")
    assert twice.reasoning == "a" and not twice.closed and not twice.well_formed
    assert split_reasoning("[r]x[/r]y", ("[r]", "[/r]")).answer == "y"


def test_data_thinking_keeps_strips_or_hands_reasoning_to_the_template():
    msgs = (
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>r1</think>a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
        {"role": "assistant", "content": "no reasoning"},
    )
    keep = apply_thinking(msgs, "keep")
    assert [m["content"] for m in keep[1::2]] == ["<think>r1</think>a1", "<think>r2</think>a2"]
    assert keep[4]["content"] == "no reasoning" and all("reasoning_content" not in m for m in keep)
    strip = apply_thinking(msgs, "strip")
    assert [m["content"] for m in strip if m["role"] == "assistant"] == ["a1", "a2", "no reasoning"]
    templ = apply_thinking(msgs, "as_template")
    assert [(m["content"], m.get("reasoning_content")) for m in templ if m["role"] == "assistant"] == [
        ("a1", "r1"),
        ("a2", "r2"),
        ("no reasoning", None),
    ]
    with pytest.raises(ValueError, match="data.thinking"):
        apply_thinking(msgs, "drop")


def test_data_thinking_decides_what_sft_trains_on(tmp_path):
    """Through the real loader and tokenizer: `keep` scores the reasoning tokens, `strip` has none,
    `as_template` renders what the template renders (the reasoning field template puts it back)."""
    from conftest import write_jsonl

    from alignkit.config import DataConfig
    from alignkit.data import formats
    from alignkit.data.splits import prepare_data
    from alignkit.data.tokenize import tokenize_sft

    rows = [
        {"messages": [{"role": "user", "content": "what is two plus two ?"}, {"role": "assistant", "content": a}]}
        for a in ("<think> two and two </think> four", "four")
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    seen = {}
    for mode, template in (("keep", "append_only"), ("strip", "append_only"), ("as_template", "reasoning_field")):
        tok = reasoning_tokenizer(REASONING_TEMPLATES[template])
        d = DataConfig(train=str(path), eval_fraction=0, thinking=mode)
        data = prepare_data(d, 0, tok, formats.load_sft_examples, tokenize_sft)
        seen[mode] = [tok.decode(it.completion_ids) for it in data.train]
        assert any("2 of 2" in n or "1 of 2" in n for n in data.notes)  # the note counts examples with reasoning
        assert seen[mode][1].startswith("four")  # a reply without reasoning is never touched
    assert seen["keep"][0].startswith("<think> two and two </think> four")
    assert seen["strip"][0].startswith("four")
    assert seen["as_template"][0] == seen["keep"][0]  # this template writes the field back inline
    tok = reasoning_tokenizer()
    ids = tok("<think> two and two </think> four", add_special_tokens=False)["input_ids"]
    assert reasoning_span(tok, ids) == [True] * 5 + [False]


def _biased(tok, open_bias: float = 4.0, close_bias: float = 3.0, seed: int = 0):
    """A tiny model that often writes `<think>` and `</think>` (a bias on their logits), so episodes
    really carry reasoning blocks; the trainer's forward uses the same head, so log-probs compare."""
    model = tiny_model(vocab_size=len(tok), seed=seed).eval()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    o, c = (tok.convert_tokens_to_ids(t) for t in TAGS)
    head.bias.data[o], head.bias.data[c] = open_bias, close_bias
    model.lm_head = head
    return model


class ToolTurns:
    """Answers each model turn with a tool message for `turns` turns, recording what it was given."""

    def __init__(self, turns: int, role: str = "tool"):
        self.left, self.seen, self.role = turns, [], role

    def step(self, message):
        self.seen.append(dict(message))
        if self.left == 0:
            return StepResult([], 1.0, True)
        self.left -= 1
        return StepResult([{"role": self.role, "content": f"yes {self.left} no"}], 0.5, False)


def _scored_logps(model, ep):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ep.prompt_ids + ep.token_ids])).logits[0].float(), -1)
    start = len(ep.prompt_ids)
    return [float(logp[start + j - 1, t]) for j, (t, m) in enumerate(zip(ep.token_ids, ep.model_mask)) if m]


@pytest.mark.parametrize("family", sorted(REASONING_TEMPLATES))
def test_episodes_score_exactly_the_sampled_tokens_under_every_template(family):
    """For each template family the trainer's log-probs of the model's tokens (one forward over the
    episode as the trainer lays it out) equal the sampler's within 1e-5, the environment gets the
    answer after the reasoning, and the tokens between turns are the template's own rendering of
    the tool message and the next generation prompt. Under the history-stripping template,
    re-rendering the conversation would have lost the earlier reasoning: the episode keeps it."""
    tok = reasoning_tokenizer(REASONING_TEMPLATES[family])
    model = _biased(tok)
    firsts = [[{"role": "user", "content": "what is one plus one ?"}], [{"role": "user", "content": "yes no"}]]
    role = "user" if family == "strips_history" else "tool"  # it strips reasoning before a user's turn
    envs = [ToolTurns(2, role), ToolTurns(3, role)]
    params = thinking_params(SamplingParams(max_new_tokens=8, temperature=1.0), tok, TAGS, None)
    eps = sample_episodes(
        model,
        tok,
        envs,
        firsts,
        params,
        max_turns=4,
        max_tokens=300,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        tags=TAGS,
    )
    close_id = tok.convert_tokens_to_ids("</think>")
    assert sum(t == close_id for ep in eps for t, m in zip(ep.token_ids, ep.model_mask) if m) >= 2
    well_formed = []
    for ep, env in zip(eps, envs):
        assert ep.turns >= 2 and sum(ep.model_mask) == len(ep.logprobs)
        assert _scored_logps(model, ep) == pytest.approx(ep.logprobs, abs=1e-5)
        assert env.seen == [m for m in ep.messages if m["role"] == "assistant"]
        for m in env.seen:  # the environment reads the final answer after the reasoning
            if "reasoning_content" in m:
                text = f"<think>{m['reasoning_content']}</think>{m['content']}"
                well_formed.append(split_reasoning(text).well_formed)
                assert m["reasoning_content"] not in m["content"]
        assert ep.reasoning_tokens is not None and ep.answer_tokens is not None
        assert ep.reasoning_tokens + ep.answer_tokens == sum(ep.model_mask)
    assert well_formed and not all(well_formed)  # some turns reasoned then answered, some did not
    if family == "strips_history":  # re-rendering the history would have changed the earlier turns' tokens
        for ep in eps:
            history = [dict(m) for m in ep.messages]
            for m in history:  # the conversation as a chat API holds it: the reasoning inline
                if "reasoning_content" in m:
                    m["content"] = f"{m.pop('reasoning_content')}</think>{m['content']}"
            text = render(tok, history, generation_prompt=True)
            earlier = [m["reasoning_content"] for m in ep.messages[:-2] if m.get("reasoning_content", "").strip()]
            assert earlier and all(r not in text for r in earlier)  # the template dropped them
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids != (ep.prompt_ids + ep.token_ids)[: len(ids)]


@pytest.mark.parametrize("family", sorted(REASONING_TEMPLATES))
def test_environment_and_template_tokens_get_zero_gradient_under_every_template(family):
    """The episodes of each template family laid out as training lays them out (a packed group,
    the model's tokens scored by the episode's mask): the summed log-prob's gradient reaches the
    final hidden state only at positions that predict a model token, never at the environment's
    or the template's; and the trainer's per-token log-probs are the sampler's (1e-5)."""
    from alignkit.data.batching import collate_packed_groups
    from alignkit.data.negative import TokenizedGroup
    from alignkit.logprobs import in_segment_order, segment_logps

    tok = reasoning_tokenizer(REASONING_TEMPLATES[family])
    model = _biased(tok)
    first = [{"role": "user", "content": "what is one plus one ?"}]
    eps = sample_episodes(
        model,
        tok,
        [ToolTurns(2, "user" if family == "strips_history" else "tool") for _ in range(2)],
        [first, first],
        thinking_params(SamplingParams(max_new_tokens=6, temperature=1.0), tok, TAGS, 3),
        max_turns=3,
        max_tokens=200,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        group_size=2,
        tags=TAGS,
    )
    group = TokenizedGroup(eps[0].prompt_ids, [e.token_ids for e in eps], 0, masks=[e.model_mask for e in eps])
    batch = collate_packed_groups([group], pad_id=tok.pad_token_id, capacity=512)
    assert batch.num_scored == sum(sum(e.model_mask) for e in eps) < sum(len(e.token_ids) for e in eps)
    captured = []
    handle = model.model.norm.register_forward_hook(lambda mod, inp, out: captured.append(out) or out.retain_grad())
    out = segment_logps(model, batch, chunk_size=16)
    handle.remove()
    assert in_segment_order(out)[0].tolist() == pytest.approx([lp for e in eps for lp in e.logprobs], abs=1e-5)
    out.logps.sum().backward()
    grad = captured[0].grad.abs().sum(-1)
    pred, scored = batch.predictor_positions(), batch.segment_ids >= 0
    predicts_scored = torch.zeros_like(scored)
    for r in range(pred.shape[0]):
        predicts_scored[r, pred[r][scored[r]]] = True
    assert grad[~predicts_scored].max() == 0.0 and (grad[predicts_scored] > 0).all()


def test_template_kinds_are_detected_and_a_template_that_cannot_continue_is_refused():
    kinds = {family: template_kind(reasoning_tokenizer(t)) for family, t in REASONING_TEMPLATES.items()}
    assert kinds == {
        "append_only": "append_only",
        "strips_history": "strips_history",
        "reasoning_field": "reasoning_field",
        "llama3_tools": "append_only",
    }
    counting = "{{ messages | length }}" + REASONING_TEMPLATES["append_only"]  # rewrites its header every turn
    with pytest.raises(TemplateError, match="model.chat_template"):
        template_kind(reasoning_tokenizer(counting))


def test_a_template_that_cannot_continue_stops_the_run_before_training(tiny_model_dir, tmp_path):
    from test_episodes import _cfg

    from alignkit.train import loop

    counting = tmp_path / "counting.jinja"
    counting.write_text("{{ messages | length }}" + REASONING_TEMPLATES["append_only"])
    with pytest.raises(ConfigError, match="cannot be continued turn by turn.*model.chat_template"):
        loop.setup(_cfg(tiny_model_dir, tmp_path, f"model.chat_template={counting}"), progress=False)
    good = tmp_path / "chatml.jinja"
    good.write_text(REASONING_TEMPLATES["append_only"])
    session = loop.setup(_cfg(tiny_model_dir, tmp_path, f"model.chat_template={good}", out="ok"), progress=False)
    assert session.recipe.episodes.template == "append_only"
    with pytest.raises(ConfigError, match="neither a file nor a Jinja template"):
        loop.setup(_cfg(tiny_model_dir, tmp_path, "model.chat_template=missing.jinja", out="x"), progress=False)


def test_thinking_budget_closes_the_block_as_context():
    """A prompt that opens the block (as DeepSeek-R1's generation prompt does) and a model that
    never closes it itself: after `budget` tokens the closing tag is inserted, not scored, with no
    log-prob of its own; the trainer's log-probs of the sampled tokens still equal the sampler's."""
    tok = reasoning_tokenizer(REASONING_TEMPLATES["strips_history"])
    model = _biased(tok, open_bias=-30.0, close_bias=-30.0)
    prompt = tok(render(tok, [{"role": "user", "content": "yes"}], generation_prompt=True), add_special_tokens=False)[
        "input_ids"
    ]
    close_id = tok.convert_tokens_to_ids("</think>")
    params = thinking_params(SamplingParams(max_new_tokens=9, temperature=1.0, n=3), tok, TAGS, 4)
    (group,) = sample_batch(
        model, [prompt], params, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id, generator=torch.Generator()
    )
    for s in group:
        assert s.token_ids[4] == close_id and close_id not in s.token_ids[:4]
        assert s.mask == [True] * 4 + [False] + [True] * (len(s.token_ids) - 5)
        assert len(s.logprobs) == len(s.token_ids) - 1 and s.thinking_cut
        assert s.reasoning_tokens == 5 and s.answer_tokens == len(s.token_ids) - 5
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + s.token_ids])).logits[0].float(), -1)
        scored = [float(logp[len(prompt) + j - 1, t]) for j, (t, m) in enumerate(zip(s.token_ids, s.mask)) if m]
        assert scored == pytest.approx(s.logprobs, abs=1e-5)
    free = thinking_params(SamplingParams(max_new_tokens=9, temperature=1.0, n=2), tok, TAGS, None)
    (group,) = sample_batch(
        model, [prompt], free, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id, generator=torch.Generator()
    )
    assert all(s.mask is None and not s.thinking_cut and close_id not in s.token_ids for s in group)


def test_thinking_tracks_blocks_the_model_opens_and_counts_multi_token_tags():
    params = SamplingParams(thinking_open=(7, 8), thinking_close=(9,), max_thinking_tokens=4)
    t = Thinking(params, [[1, 2]])
    for tok in (5, 7, 8, 6, 6):  # answer, the two-token open tag, two reasoning tokens: 4 in the block
        assert t.forced(0) is None
        t.add(0, tok)
    assert t.inside[0] and t.block[0] == 4 and t.pending[0] == [9]
    assert t.forced(0) == 9
    t.add(0, 9)
    assert not t.inside[0] and t.reasoning[0] == 5 and t.answer[0] == 1 and t.cut[0]
    t.add(0, 5)
    assert t.answer[0] == 2 and t.forced(0) is None


def test_thinking_budget_needs_tags_the_tokenizer_writes():
    tok = reasoning_tokenizer()
    with pytest.raises(ConfigError, match="data.thinking_tags"):
        thinking_params(SamplingParams(), tok, ("<reason>", "</reason>"), 8)
    assert thinking_params(SamplingParams(), tok, ("<reason>", "</reason>"), None).thinking_open == ()


def test_rewards_read_the_answer_and_the_format_reward_reads_the_block():
    reward = build_reward([{"name": "numeric_match"}, {"name": "reasoning_format"}])
    groups = [["<think> two and two </think> 4", "<think> 4 and 5 </think> 9", "<think> four is it", "4"]]
    scores, parts = score_groups(reward, ["q"], groups, {"answer": ["#### 4"]})
    assert parts["numeric_match"] == [1.0, 0.0, 0.0, 1.0]  # the answer after the block, never the reasoning's 4
    assert parts["reasoning_format"] == [1.0, 1.0, 0.0, 0.0]
    assert scores.tolist() == [[2.0, 1.0, 0.0, 1.0]]
    with pytest.raises(ConfigError, match="tags"):
        build_reward({"name": "reasoning_format", "tags": ["<think>"]})


def test_thinking_settings_are_checked(tiny_model_dir):
    from alignkit.config import load_config

    base = [f"model.name_or_path={tiny_model_dir}", "data.train=x.jsonl", "recipe=grpo", "online.rewards=length"]
    with pytest.raises(ConfigError, match="max_thinking_tokens.*below"):
        load_config(None, base + ["generation.max_thinking_tokens=500", "generation.max_new_tokens=64"])
    with pytest.raises(ConfigError, match="thinking_tags"):
        load_config(None, base + ["data.thinking_tags=[<t>]"])
    with pytest.raises(ConfigError, match="data.thinking"):
        load_config(None, base + ["data.thinking=drop"])
    budget = ["generation.max_thinking_tokens=8", "generation.backend=vllm"]
    load_config(None, base + budget)  # on vLLM: generated in phases, in lockstep or asynchronously
    load_config(None, base + budget + ["online.async.mode=one_step_off"])


def _reasoning_model_dir(path, template="append_only"):
    tok = reasoning_tokenizer(REASONING_TEMPLATES[template])
    tiny_model(vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", ["keep", "strip"])
def test_data_show_marks_reasoning_tokens(tmp_path, capsys, mode):
    from conftest import base_overrides, write_jsonl

    from alignkit.cli import main
    from alignkit.config import load_config, save_config

    model_dir = _reasoning_model_dir(tmp_path / "m")
    rows = [{"prompt": "what is two plus two ?", "completion": "<think> two and two </think> four"}] * 3
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = load_config(
        None,
        base_overrides(model_dir, data, tmp_path / "run", tmp_path / "cache")
        + ["recipe=sft", "data.eval_fraction=0", f"data.thinking={mode}"],
    )
    save_config(cfg, tmp_path / "c.yaml")
    assert main(["data", "show", "--config", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 examples hold reasoning blocks (data.thinking=" + mode in out
    if mode == "keep":
        assert "5 of them in a reasoning block" in out
        assert len([line for line in out.splitlines() if line.endswith("reasoning") and " yes " in line]) == 5
    else:
        assert "in a reasoning block" not in out and "'four'" in out


def test_grpo_trains_with_a_thinking_budget_and_the_format_reward(tmp_path):
    """End to end on a model whose template opens the reasoning block: every sample is budgeted,
    the inserted closing tags are context (the trainer's log-probs of the sampled tokens still equal
    the sampler's), and the run logs reasoning and answer lengths and the share cut."""
    from conftest import base_overrides, write_jsonl

    from alignkit.config import load_config
    from alignkit.train import loop
    from alignkit.train.metrics import read_metrics

    model_dir = _reasoning_model_dir(tmp_path / "m", "strips_history")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"what is {i} plus {i} ?"} for i in range(8)])
    cfg = load_config(
        None,
        base_overrides(model_dir, data, tmp_path / "run", tmp_path / "cache")
        + [
            "recipe=grpo",
            "online.rewards=[{name: reasoning_format, min_reasoning_words: 0}, {name: length, max_words: 4}]",
            "generation.num_samples=2",
            "generation.temperature=1.0",
            "generation.max_new_tokens=8",
            "generation.max_thinking_tokens=3",
            "train.batch_size=2",
            "train.max_steps=2",
            "data.eval_fraction=0",
            "data.max_length=64",
        ],
    )
    session = loop.setup(cfg, progress=False)
    rollout = session.recipe.batches(session.model, session.data.train[:2], key=0)[0]
    masks = [m for g in rollout.groups for m in g.masks if m is not None]
    assert masks and all(m[3] is False and sum(m) == len(m) - 1 for m in masks)  # the tag inserted after 3
    _, metrics = session.recipe.loss(session.model, rollout, "train")
    assert float(metrics["logprob_mismatch_max"]) < 1e-4
    run = loop.train(cfg, progress=False).run_dir
    rows = read_metrics(run, "train")
    assert len(rows) == 2
    for r in rows:
        assert r["thinking_cut"] > 0.5 and 0 < r["reasoning_length"] <= 4.0  # 3 sampled + the tag at most
        assert r["answer_length"] == pytest.approx(r["completion_length"] - r["reasoning_length"])


def test_thinking_reads_tags_the_model_writes_in_other_tokens():
    """With a decoder, a closing tag written in tokens other than the tag's own encoding still
    closes the block (a BPE model may write " </" "think" ">"): no budget is then forced."""
    pieces = {5: "a", 6: " </", 7: "think", 8: ">", 9: "</think>", 10: "<think>"}
    params = SamplingParams(thinking_open=(10,), thinking_close=(9,), max_thinking_tokens=6)
    by_text = Thinking(params, [[10]], lambda ids: "".join(pieces[i] for i in ids))
    by_ids = Thinking(params, [[10]])
    for tok in (5, 6, 7, 8, 5, 5, 5):
        by_text.add(0, tok)
        by_ids.add(0, tok)
    assert not by_text.inside[0] and not by_text.pending[0] and by_text.answer[0] == 3
    assert by_ids.inside[0] and by_ids.pending[0] == [9]  # ids alone miss it and would cut the block


def test_budget_on_a_token_backend_generates_in_phases():
    """`BudgetedBackend` (the budget on vLLM and sampling servers), here over alignkit's own
    sampler as a token-in, token-out backend: a prompt that opens the block, a model that never
    closes it: the closing tag follows exactly `budget` sampled tokens, as context (no log-prob,
    masked), the answer phase follows, the log-probs are the trainer's, and it is seeded."""
    from alignkit.generation.backends import TransformersBackend
    from alignkit.generation.budget import BudgetedBackend

    tok = reasoning_tokenizer(REASONING_TEMPLATES["strips_history"])
    model = _biased(tok, open_bias=-30.0, close_bias=-30.0)
    prompt = tok(render(tok, [{"role": "user", "content": "yes"}], generation_prompt=True), add_special_tokens=False)[
        "input_ids"
    ]
    close_id = tok.convert_tokens_to_ids("</think>")
    backend = BudgetedBackend(TransformersBackend(model, tok), tok)
    params = thinking_params(SamplingParams(max_new_tokens=9, temperature=1.0, n=3, logprobs="processed"), tok, TAGS, 4)
    (group,) = backend.sample([prompt], params, seed=0, prompt_seeds=[7])
    assert [s.token_ids for s in backend.sample([prompt], params, seed=0, prompt_seeds=[7])[0]] == [
        s.token_ids for s in group
    ]
    for s in group:
        assert s.token_ids[4] == close_id and close_id not in s.token_ids[:4]
        assert s.mask[:5] == [True] * 4 + [False] and len(s.logprobs) == len(s.token_ids) - 1
        assert s.thinking_cut and s.reasoning_tokens == 5 and "</think>" in s.text
        with torch.no_grad():
            logits = model(torch.tensor([prompt + s.token_ids])).logits[0].float()
        from alignkit.logprobs import sampling_scores

        x = sampling_scores(logits, params)
        logp = x - torch.logsumexp(x, -1, keepdim=True)
        scored = [float(logp[len(prompt) + j - 1, t]) for j, (t, m) in enumerate(zip(s.token_ids, s.mask)) if m]
        assert scored == pytest.approx(s.logprobs, abs=1e-5)
    plain = params.but(max_thinking_tokens=None)
    assert all(s.mask is None for s in backend.sample([prompt], plain, seed=0)[0])  # no budget: passed through

    class Labelled:  # a server that labels its tokens, and takes a weight update after each request
        def __init__(self, inner):
            self.inner, self.asked = inner, []

        def sample(self, prompts, params, seed, prompt_seeds=None, min_version=0):
            out = self.inner.sample(prompts, params, seed, prompt_seeds)
            for g in out:
                for s in g:
                    s.versions = [min_version + len(self.asked)] * len(s.token_ids)
            self.asked.append(min_version)
            return out

    labelled = Labelled(TransformersBackend(model, tok))
    (served,) = BudgetedBackend(labelled, tok).sample([prompt], params, seed=0, prompt_seeds=[7], min_version=2)
    assert labelled.asked == [2, 2]  # the reasoning phase, then the answer phase, both at the run's version
    for s in served:  # phase 1 sampled by version 2 (the inserted tag: its token before's), phase 2 by 3
        assert s.versions == [2] * 5 + [3] * (len(s.token_ids) - 5)


def test_eval_scores_the_answer_after_the_reasoning():
    from types import SimpleNamespace

    from alignkit.eval.run import _scores_by_reward

    cfg = SimpleNamespace(rewards=[build_reward("numeric_match"), build_reward("reasoning_format")])
    got = _scores_by_reward(cfg, ["q", "q"], ["<think> 4 and 5 </think> 9", "9"], {"answer": ["#### 9", "#### 4"]})
    assert list(got.values()) == [[1.0, 0.0], [1.0, 0.0]]
