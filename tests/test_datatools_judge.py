"""The principle judge (alignkit.rewards.judge): scores and comparisons read from a fake model's
log-probs and worked out by hand, the conversation the judge model receives, the principles file,
`build_reward({name: judge, ...})` over a tiny local model, and LocalModel.option_logprobs against a
plain forward pass."""

import math

import pytest
import torch

from alignkit.errors import AlignkitError, ConfigError
from alignkit.generation.text_models import LocalModel
from alignkit.rewards import build_reward
from alignkit.rewards.judge import SCORE_LIMIT, PrincipleJudge
from alignkit.testing import tiny_model, tiny_tokenizer

PRINCIPLES = ["Be kind.", "Be brief."]
# Short templates whose text after the principles is easy to look up: "prompt|reply" or "prompt|a|b".
SCORE = "{principles}|{prompt}|{reply}"
COMPARE = "{principles}|{prompt}|{reply_a}|{reply_b}"


class TableModel:
    """A fake TextModel: the option log-probs of a judge prompt are looked up by the text after the
    numbered principles; every call is recorded."""

    name = "table"

    def __init__(self, table: dict):
        self.table, self.calls = table, []

    def option_logprobs(self, conversations, options):
        self.calls.append((conversations, options))
        return [self.table[c[0]["content"].split("|", 1)[1]] for c in conversations]


class ConstantModel:
    """A fake TextModel giving every judge prompt the same option log-probs; every call is recorded."""

    name = "constant"

    def __init__(self, row: list):
        self.row, self.calls = row, []

    def option_logprobs(self, conversations, options):
        self.calls.append((conversations, options))
        return [list(self.row) for _ in conversations]


def test_score_is_log_p_yes_minus_log_p_no():
    lm = TableModel({"hi|good": [-0.25, -1.75], "hi|bad": [-3.0, -0.5]})
    judge = PrincipleJudge(lm, PRINCIPLES, template=SCORE)
    assert judge.score(["hi", "hi"], ["good", "bad"]) == [1.5, -2.5]  # -0.25 - (-1.75); -3.0 - (-0.5)
    assert lm.calls[0][1] == ["Yes", "No"]
    assert judge(["hi"], ["good"], answer=["unused"]) == [1.5]  # the reward interface; other columns unused
    assert judge.name == "judge" and judge.score([], []) == []


def test_compare_averages_both_orders():
    # The fake judge leans towards position A: A wins in both orders, by less when b is in front.
    lm = TableModel({"q|x|y": [-0.1, -2.5], "q|y|x": [-0.4, -1.2]})
    judge = PrincipleJudge(lm, PRINCIPLES, compare_template=COMPARE)
    # forward: -0.1 - (-2.5) = 2.4; swapped: -0.4 - (-1.2) = 0.8; (2.4 - 0.8) / 2 = 0.8
    assert judge.compare(["q"], ["x"], ["y"]) == [pytest.approx(0.8, abs=1e-12)]
    assert judge.compare(["q"], ["y"], ["x"]) == [pytest.approx(-0.8, abs=1e-12)]  # antisymmetric
    conversations, options = lm.calls[0]
    assert options == ["A", "B"]
    shown = "1. Be kind.\n2. Be brief."
    assert [c[0]["content"] for c in conversations] == [f"{shown}|q|x|y", f"{shown}|q|y|x"]


def test_the_judge_model_receives_the_users_template():
    lm = ConstantModel([-1.0, -2.0])
    template = 'Rules:\n{principles}\n\n{prompt}\n---\n{reply}\nJSON: {"ok": true}\nVerdict?'
    judge = PrincipleJudge(lm, PRINCIPLES, template=template)
    prompt = [
        {"role": "user", "content": "what is 2 plus 2 ?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3 plus 3 ?"},
    ]
    assert judge.score([prompt], ["6 {prompt}"]) == [1.0]
    assert lm.calls == [
        (
            [
                [
                    {
                        "role": "user",
                        "content": "Rules:\n1. Be kind.\n2. Be brief.\n\n"
                        "User: what is 2 plus 2 ?\n\nAssistant: 4\n\nUser: and 3 plus 3 ?\n---\n"
                        '6 {prompt}\nJSON: {"ok": true}\nVerdict?',
                    }
                ]
            ],
            ["Yes", "No"],
        )
    ]
    # the default template, with a single-turn prompt shown as its text
    PrincipleJudge(lm, PRINCIPLES).score(["what is 2 plus 2 ?"], ["4"])
    text = lm.calls[-1][0][0][0]["content"]
    assert "Principles:\n1. Be kind.\n2. Be brief.\n" in text and "\nwhat is 2 plus 2 ?\n" in text
    assert "reply:\n4\n" in text and text.endswith("Yes or No.")


def test_infinite_gaps_are_clipped_and_no_answer_is_an_error():
    lm = TableModel({"p|sure": [-0.01, -math.inf], "p|never": [-math.inf, -0.2], "p|lost": [-math.inf, -math.inf]})
    judge = PrincipleJudge(lm, PRINCIPLES, template=SCORE)
    assert judge.score(["p", "p"], ["sure", "never"]) == [SCORE_LIMIT, -SCORE_LIMIT]
    with pytest.raises(AlignkitError, match="neither 'Yes' nor 'No'"):
        judge.score(["p"], ["lost"])


def test_exact_gaps_are_kept_and_only_unmeasured_ones_bounded_and_counted():
    # Issue 26: a judge sure of one position gives gaps beyond SCORE_LIMIT in both orders; bounding
    # finite gaps made every such comparison exactly 0. Only a -inf (an option the endpoint's top 20
    # did not show) is bounded, and counted.
    lm = TableModel(
        {
            "p|far": [-0.01, -30.0],
            "p|sure": [-0.01, -math.inf],
            "p|never": [-math.inf, -0.2],
            "q|x|y": [-0.001, -25.0],
            "q|y|x": [-0.002, -23.0],
        }
    )
    judge = PrincipleJudge(lm, PRINCIPLES, template=SCORE, compare_template=COMPARE)
    assert judge.score(["p"] * 3, ["far", "sure", "never"]) == [
        pytest.approx(29.99, abs=1e-12),
        SCORE_LIMIT,
        -SCORE_LIMIT,
    ]
    assert (judge.clipped, judge.answers, judge.last_clipped) == (2, 3, [0, 1, 1])
    # (24.999 - 22.998) / 2 = 1.0005: the preference survives the position bias
    assert judge.compare(["q"], ["x"], ["y"]) == [pytest.approx(1.0005, abs=1e-12)]
    assert (judge.clipped, judge.answers, judge.last_clipped) == (2, 5, [0])
    lm.table["q|y|x"] = [-math.inf, -0.5]
    assert judge.compare(["q"], ["x"], ["y"]) == [pytest.approx((24.999 + SCORE_LIMIT) / 2, abs=1e-12)]
    assert (judge.clipped, judge.answers, judge.last_clipped) == (3, 7, [1])
    lm.table["p|nan"] = [math.nan, -1.0]
    with pytest.raises(AlignkitError, match="a log-prob is a finite number or -inf"):
        judge.score(["p"], ["nan"])


def test_templates_and_principles_are_checked():
    with pytest.raises(ConfigError, match=r"`template` lacks \{reply\}"):
        PrincipleJudge(TableModel({}), PRINCIPLES, template="{principles} {prompt}")
    with pytest.raises(ConfigError, match=r"lacks \{reply_b\}"):
        PrincipleJudge(TableModel({}), PRINCIPLES, compare_template="{principles} {prompt} {reply_a}")
    with pytest.raises(ConfigError, match="non-empty list"):
        PrincipleJudge(TableModel({}), "Be kind.")
    with pytest.raises(ValueError, match="2 prompts but 1 replies"):
        PrincipleJudge(TableModel({}), PRINCIPLES).score(["a", "b"], ["x"])


def test_load_principles_file(tmp_path):
    from alignkit.rewards.principles import load_principles

    path = tmp_path / "p.yaml"
    path.write_text('principles:\n  - Be kind.\n  - Be brief.\ntemplate: "{principles} / {prompt} / {reply}"\n')
    loaded = load_principles(path)
    assert (loaded.principles, loaded.template, loaded.compare_template) == (
        PRINCIPLES,
        "{principles} / {prompt} / {reply}",
        None,
    )
    assert PrincipleJudge.from_file(TableModel({}), path).template == "{principles} / {prompt} / {reply}"
    path.write_text("principle:\n  - Be kind.\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown key `principle`.*did you mean `principles`"):
        load_principles(path)
    path.write_text('template: "{principles} {prompt} {reply}"\n')
    with pytest.raises(ConfigError, match=f"{path}: missing key `principles`"):
        load_principles(path)
    path.write_text("principles: [Be kind., '']\n")
    with pytest.raises(ConfigError, match=f"{path}: principles\\[1\\] must be a non-empty string"):
        load_principles(path)
    path.write_text('principles: [Be kind.]\ncompare_template: "{principles} {prompt}"\n')
    with pytest.raises(ConfigError, match=f"{path}: `compare_template` lacks"):
        PrincipleJudge.from_file(TableModel({}), path)
    with pytest.raises(ConfigError, match="principles file .*missing.yaml not found"):
        load_principles(tmp_path / "missing.yaml")


def test_build_reward_judge_over_a_tiny_local_model(tmp_path, tiny_model_dir):
    path = tmp_path / "p.yaml"
    path.write_text("principles: [Be kind., Be brief.]\n")
    judge = build_reward({"name": "judge", "principles": str(path), "model": str(tiny_model_dir)}, device="cpu")
    assert isinstance(judge, PrincipleJudge) and isinstance(judge.lm, LocalModel)
    scores = judge(["what is 2 plus 2 ?", [{"role": "user", "content": "hello"}]], ["4", "hello world"])
    # "Yes" and "No" are both <unk> in the tiny word-level vocabulary (it has only "yes" and "no"),
    # so the two log-probs are the same number and the gap is exactly 0.
    assert scores == [0.0, 0.0]


def test_build_reward_judge_names_its_options(tmp_path):
    with pytest.raises(ConfigError, match="unknown option.*`modle`.*principles, model, endpoint.*Did you mean `model`"):
        build_reward({"name": "judge", "principles": "p.yaml", "modle": "x"})
    with pytest.raises(ConfigError, match="reward judge needs `principles`"):
        build_reward({"name": "judge"})
    with pytest.raises(ConfigError, match="principles file .*nowhere.yaml not found"):
        build_reward({"name": "judge", "principles": str(tmp_path / "nowhere.yaml")})
    with pytest.raises(ConfigError, match="`tokenizer` is for an `endpoint`"):
        build_reward({"name": "judge", "principles": "p.yaml", "tokenizer": "x"})


def test_build_reward_judge_on_an_endpoint_takes_its_tokenizer_and_key(tmp_path, tiny_model_dir):
    from alignkit.generation.text_models import EndpointModel

    path = tmp_path / "p.yaml"
    path.write_text("principles: [Be kind.]\n")
    key = tmp_path / "server.token"
    key.write_text("secret-token-1234567890\n")
    judge = build_reward(
        {
            "name": "judge",
            "principles": str(path),
            "endpoint": "http://127.0.0.1:9/v1",
            "model": "m",
            "tokenizer": str(tiny_model_dir),
            "api_key_file": str(key),
        }
    )
    assert isinstance(judge.lm, EndpointModel) and judge.lm.tokenizer is not None
    assert judge.lm.client.api_key == "secret-token-1234567890"
    with pytest.raises(ConfigError, match="cannot read `api_key_file`"):
        build_reward(
            {
                "name": "judge",
                "principles": str(path),
                "endpoint": "http://127.0.0.1:9/v1",
                "model": "m",
                "api_key_file": str(tmp_path / "missing"),
            }
        )


def test_local_option_logprobs_match_a_plain_forward_pass():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok), seed=1).eval()
    conversations = [
        [{"role": "user", "content": "what is 2 plus 2 ?"}],
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "tell me a short story"},
        ],
    ]
    options = ["4", "the answer is 4 ."]  # different lengths: LocalModel pads the shorter row
    got = LocalModel(model, tok).option_logprobs(conversations, options)
    for conv, row in zip(conversations, got):
        prompt = tok(
            tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True), add_special_tokens=False
        )["input_ids"]
        for option, value in zip(options, row):
            ids = tok(option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].double()  # [T, V]
            shifted = logits - logits.max(-1, keepdim=True).values
            logp = shifted - shifted.exp().sum(-1, keepdim=True).log()  # log-softmax by hand
            want = sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(ids))
            # 1e-5: the model runs in float32 and LocalModel batches the options with padding, so its
            # sums differ from this one-row float64 log-softmax by float32 rounding (~1e-6)
            assert value == pytest.approx(want, abs=1e-5)
    assert len(got) == 2 and all(len(r) == 2 for r in got) and got[0][0] != got[0][1]
