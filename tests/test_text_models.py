"""The data tools' model interface (issue 19): a local model and an OpenAI-compatible endpoint give
the same answers; the endpoint client retries transient failures, names an unreachable endpoint,
and hands back what was answered before an error."""

import socket

import pytest
import torch
from openai_server import OpenAIServer

from alignkit.generation.decode import SamplingParams
from alignkit.generation.text_models import EndpointError, EndpointModel, LocalModel
from alignkit.testing import tiny_model, tiny_tokenizer

CONVS = [[{"role": "user", "content": "what is one plus one ?"}], [{"role": "user", "content": "yes no"}]]


@pytest.fixture(scope="module")
def local():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    return LocalModel(tiny_model(vocab_size=len(tok), hidden=32).eval(), tok, batch_size=4)


def test_endpoint_and_local_model_answer_alike(local):
    greedy = SamplingParams(max_new_tokens=6)
    with OpenAIServer(local) as server:
        remote = EndpointModel(server.url, "tiny", concurrency=2)
        assert remote.chat(CONVS, greedy) == local.chat(CONVS, greedy)
        assert remote.complete(["<|im_start|>user\n"], greedy.but(n=2)) == local.complete(
            ["<|im_start|>user\n"], greedy.but(n=2)
        )
        # a judge's options: the two likeliest first reply tokens (both within the server's top 20)
        from alignkit.generation.hf import encode_prompts

        with torch.no_grad():
            logits = local.model(input_ids=torch.tensor([encode_prompts(local.tokenizer, [CONVS[0]])[0]])).logits[0, -1]
        options = [local.tokenizer.decode([int(t)]) for t in torch.topk(logits, 2).indices]
        want = local.option_logprobs(CONVS[:1], options)[0]
        assert remote.option_logprobs(CONVS[:1], options)[0] == pytest.approx(want, abs=1e-4)


def test_transient_failures_are_retried(local):
    with OpenAIServer(local, fail_first=2) as server:
        remote = EndpointModel(server.url, "tiny", concurrency=1, retries=3)
        got = []
        out = remote.chat(CONVS, SamplingParams(max_new_tokens=4), on_result=lambda i, r: got.append(i))
        assert len(out) == 2 and sorted(got) == [0, 1] and server.requests == 4  # 2 refusals, then both answered


def test_a_lasting_failure_keeps_what_was_answered(local):
    with OpenAIServer(local, fail_first=2) as server:  # the first request fails both of its attempts
        remote = EndpointModel(server.url, "tiny", concurrency=1, retries=1)
        got = []
        with pytest.raises(EndpointError, match=r"failed after 2 attempt.*2 of 3 requests were answered and kept"):
            remote.chat(CONVS + CONVS[:1], SamplingParams(max_new_tokens=4), on_result=lambda i, r: got.append(i))
        assert sorted(got) == [1, 2]


def test_an_unreachable_endpoint_is_named():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = EndpointModel(f"http://127.0.0.1:{port}/v1", "tiny", retries=1, timeout_s=5)
    with pytest.raises(EndpointError, match=rf"endpoint http://127.0.0.1:{port}/v1 \(model tiny\) unreachable after 2"):
        remote.chat(CONVS[:1], SamplingParams(max_new_tokens=4))
