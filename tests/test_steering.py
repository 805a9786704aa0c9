"""Activation steering (alignkit.inference.steering) on tiny random models: hidden states are block
outputs (checked against a manual hook and against transformers' output_hidden_states), directions
on hand-made data (mean_diff, pca, probe), separation worked out by hand, save/load with the model
fingerprint, and steering that adds exactly strength * vector at the chosen positions."""

import math

import pytest
import torch

from alignkit.data.examples import PreferenceExample
from alignkit.errors import AlignkitError, ConfigError, DataError, ModelError
from alignkit.generation.decode import SamplingParams, sample
from alignkit.generation.hf import encode_prompts, generate
from alignkit.inference.steering import (
    Direction,
    check_strength,
    fit_direction,
    fit_directions,
    hidden_states,
    load_vectors,
    midpoint,
    preference_items,
    save_vectors,
    separation,
    steer,
    steering_fingerprint,
)
from alignkit.models import transformer_blocks
from alignkit.testing import tiny_model, tiny_tokenizer

PROMPTS = [
    [{"role": "user", "content": "what is 2 plus 3 ?"}],
    [{"role": "user", "content": "hello"}],
    [{"role": "user", "content": "tell me about the sky"}],
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", vocab_size=len(tok), seed=0).eval()


def block_output(model, layer, **inputs):
    """(output of block `layer` [B, T, H], model output) of one forward, read by a hook of our own."""
    got = {}
    handle = transformer_blocks(model)[layer].register_forward_hook(
        lambda m, a, out: got.__setitem__("h", out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        handle.remove()
    return got["h"], out


def unit_vector(hidden, seed=3):
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


# ---------------------------------------------------------------------------------------------
# Reading


def test_hidden_states_are_block_outputs_at_the_last_token_or_the_reply_mean(model, tok):
    items = [([{"role": "user", "content": "hello"}], "yes good"), "the cat is blue", PROMPTS[0]]
    got = hidden_states(model, tok, items, [0, 1], batch_size=8)
    mean = hidden_states(model, tok, items, [1], position="mean", batch_size=1)
    assert set(got) == {0, 1} and got[0].shape == (3, 32)
    # prompt + reply: the chat template's rendering; the reply starts after "<|im_start|> assistant"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes good"}], tokenize=False
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert tok.convert_ids_to_tokens(ids[0])[-4:] == ["assistant", "yes", "good", "<|im_end|>"]
    for layer in (0, 1):
        h, out = block_output(model, layer, input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(got[layer][0], h[0, -1], rtol=0, atol=1e-6)  # padding in a batch of 3
        if layer == 1:
            torch.testing.assert_close(mean[1][0], h[0, -3:].mean(0), rtol=0, atol=1e-6)  # yes good <|im_end|>
        # transformers' convention: hidden_states[l + 1] is block l's output, except for the last
        # block, whose entry is taken after the final norm; hence our hooks.
        if layer < 1:
            assert torch.equal(out.hidden_states[layer + 1], h)
        else:
            assert not torch.allclose(out.hidden_states[layer + 1], h)
    # a plain string is its own reply: its mean is over all its tokens
    ids = torch.tensor([tok("the cat is blue", add_special_tokens=False)["input_ids"]])
    h, _ = block_output(model, 1, input_ids=ids)
    torch.testing.assert_close(mean[1][1], h[0].mean(0), rtol=0, atol=1e-6)


def test_preference_items_pair_prompt_with_chosen_and_rejected():
    ex = PreferenceExample(
        prompt=({"role": "user", "content": "hi"},),
        chosen=({"role": "assistant", "content": "a"},),
        rejected=({"role": "assistant", "content": "b"},),
        source="x:1",
    )
    plain = PreferenceExample(
        prompt=({"role": "user", "content": "q"},),
        chosen=({"role": "assistant", "content": "c"},),
        rejected=({"role": "assistant", "content": "r"},),
        source="x:2",
        plain_text=True,
    )
    pos, neg = preference_items([ex, plain])
    assert pos == [(ex.prompt, ex.chosen), ("q", "c")]
    assert neg == [(ex.prompt, ex.rejected), ("q", "r")]


# ---------------------------------------------------------------------------------------------
# Directions and separation


def test_mean_diff_and_pca_on_a_hand_made_2d_dataset():
    neg = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    diffs = torch.tensor([[4.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    pos = neg + diffs
    # mean difference (1, 0.75): length 1.25, unit (0.8, 0.6)
    direction = fit_direction(pos, neg, "mean_diff")
    assert isinstance(direction, Direction)
    unit, norm = direction
    torch.testing.assert_close(unit, torch.tensor([0.8, 0.6], dtype=torch.float64), rtol=0, atol=1e-12)
    assert norm == pytest.approx(1.25, abs=1e-12)
    # paired differences: D^T D = diag(16, 3), top component (1, 0); sign: pos projects higher
    d = fit_direction(pos, neg, "pca")
    torch.testing.assert_close(d.unit, torch.tensor([1.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    assert d.norm == pytest.approx(1.25, abs=1e-12)  # the unit of strength is the same for every method
    torch.testing.assert_close(d.vector, torch.tensor([1.25, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    # swapping pos and neg flips the direction
    torch.testing.assert_close(fit_direction(neg, pos, "pca").unit, -d.unit, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="paired"):
        fit_direction(pos, neg[:3], "pca")
    with pytest.raises(ValueError, match="unknown direction method 'lda'"):
        fit_direction(pos, neg, "lda")
    with pytest.raises(ValueError, match="do not differ"):
        fit_direction(pos, pos.clone(), "mean_diff")


def contrast(n, seed):
    """Pairs separated only along x1 - x0 (pos: +1, neg: -1) under a shared component of std 3 that
    swamps the mean difference (which points along x1): separable, but not by the mean difference."""
    g = torch.Generator().manual_seed(seed)
    a, b, c = 3 * torch.randn(n, generator=g), 3 * torch.randn(n, generator=g), torch.randn(2, n, generator=g)
    pos = torch.stack([a, a + 1, c[0]], 1)
    neg = torch.stack([b, b - 1, c[1]], 1)
    return pos, neg


def test_probe_separates_linearly_separable_data():
    pos, neg = contrast(40, seed=0)
    test_pos, test_neg = contrast(40, seed=1)
    probe = fit_direction(pos, neg, "probe")
    assert separation(probe, test_pos, test_neg)["accuracy"] == 1.0
    t = midpoint(probe, pos, neg)
    assert separation(probe, test_pos, test_neg, threshold=t)["accuracy"] == 1.0
    # the direction comes back in activation space: the separating one is (-1, 1, 0) / sqrt 2
    ideal = torch.tensor([-1.0, 1.0, 0.0]) / math.sqrt(2)
    assert float(probe.unit @ ideal) > 0.99  # regularised fit: close to, not exactly, the max-margin direction
    assert torch.equal(fit_direction(pos, neg, "probe").unit, probe.unit)  # deterministic
    assert separation(fit_direction(pos, neg, "mean_diff"), test_pos, test_neg)["accuracy"] < 0.9


def test_separation_worked_out_by_hand():
    u = torch.tensor([2.0, 0.0])  # normalised inside: projections are the first coordinate
    pos = torch.tensor([[3.0, 0.0], [1.0, 5.0], [2.0, 1.0]])
    neg = torch.tensor([[1.0, 9.0], [2.0, 0.0], [0.0, 0.0]])
    # projections pos (3, 1, 2), neg (1, 2, 0): pairs 3>1, 1<2, 2>0 -> 2/3; means 2 and 1, variances
    # 2/3 and 2/3: fisher = 1 / (4/3) = 0.75
    s = separation(u, pos, neg)
    assert s["accuracy"] == pytest.approx(2 / 3, abs=1e-12)
    assert s["fisher"] == pytest.approx(0.75, abs=1e-12) and s["gap"] == pytest.approx(1.0, abs=1e-12)
    # unpaired at 1.5: pos 3, 2 above, neg 1, 0 below -> 4/6; at 2: ties count as wrong -> 3/6
    assert separation(u, pos, neg, threshold=1.5)["accuracy"] == pytest.approx(4 / 6, abs=1e-12)
    assert separation(u, pos, neg, threshold=2.0)["accuracy"] == pytest.approx(3 / 6, abs=1e-12)
    # midpoint of the means (2, 7/3) and (1, 3) along (1, 0): 1.5
    assert midpoint(u, pos, neg) == pytest.approx(1.5, abs=1e-12)
    with pytest.raises(ValueError, match="threshold=midpoint"):
        separation(u, pos, neg[:2])


# ---------------------------------------------------------------------------------------------
# Saving and loading


def test_save_load_round_trip_and_fingerprint_check(model, tok, tmp_path):
    pos = hidden_states(model, tok, ["yes good", "the answer is 5"], [0, 1])
    neg = hidden_states(model, tok, ["sorry i cannot help", "no bad"], [0, 1])
    dirs = fit_directions(pos, neg, "mean_diff")
    vectors = {l: d.vector for l, d in dirs.items()}
    save_vectors(
        tmp_path / "v", vectors, {"fingerprint": steering_fingerprint(model), "method": "mean_diff", "source": "test"}
    )
    same = tiny_model("llama", vocab_size=len(tok), seed=0)
    loaded, meta = load_vectors(tmp_path / "v", same)
    assert set(loaded) == {0, 1} and all(torch.equal(loaded[l], vectors[l]) for l in vectors)
    assert meta["method"] == "mean_diff" and meta["layers"] == [0, 1] and meta["hidden_size"] == 32
    assert meta["norms"]["1"] == pytest.approx(dirs[1].norm, rel=1e-6)  # float32 vector norm
    # a float32 and a bfloat16 copy of one checkpoint share a fingerprint
    assert steering_fingerprint(same.to(torch.bfloat16)) == steering_fingerprint(model)
    fp = steering_fingerprint(model)["weights_sha256"]
    other = tiny_model("llama", vocab_size=len(tok), seed=1)
    with pytest.raises(ModelError, match="fingerprint mismatch") as err:
        load_vectors(tmp_path / "v", other)
    assert fp in str(err.value) and steering_fingerprint(other)["weights_sha256"] in str(err.value)
    with pytest.raises(ModelError, match="hidden_size=32.*hidden_size=48"):
        load_vectors(tmp_path / "v", tiny_model("llama", vocab_size=len(tok), hidden=48))
    with pytest.raises(ValueError, match="fingerprint"):
        save_vectors(tmp_path / "w", vectors, {"method": "mean_diff"})


# ---------------------------------------------------------------------------------------------
# Steering


@pytest.mark.parametrize("positions,steered", [("all", True), ("prompt", True), ("generated", False)])
def test_a_plain_forward_is_a_prompt_pass(model, tok, positions, steered):
    ids = torch.tensor(encode_prompts(tok, PROMPTS[:1]))
    v, strength = 0.5 * unit_vector(32), 2.0
    base, base_out = block_output(model, 0, input_ids=ids)
    with steer(model, {0: v}, strength, positions):
        h, out = block_output(model, 0, input_ids=ids)
    # the hook adds strength * v to block 0's output at every position of the call, or nothing
    assert torch.equal(h, base + strength * v if steered else base)
    assert torch.equal(out.logits, base_out.logits) != steered


@pytest.mark.parametrize("positions,steered", [("all", True), ("prompt", False), ("generated", True)])
def test_a_decoding_step_with_a_kv_cache_is_a_generated_pass(model, tok, positions, steered):
    ids = torch.tensor(encode_prompts(tok, PROMPTS[1:2]))
    v, strength = unit_vector(32), -1.5

    def step(steering):
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).past_key_values  # unsteered prefill
        nxt = torch.tensor([[5]])
        if steering is None:
            return block_output(model, 0, input_ids=nxt, past_key_values=cache, use_cache=True)[0]
        with steer(model, {0: v}, strength, steering):
            return block_output(model, 0, input_ids=nxt, past_key_values=cache, use_cache=True)[0]

    base, h = step(None), step(positions)
    assert h.shape == (1, 1, 32)
    assert torch.equal(h, base + strength * v if steered else base)


def test_generation_strength_zero_and_generated_only(model, tok):
    v = {0: 4.0 * unit_vector(32), 1: 4.0 * unit_vector(32, seed=4)}
    params = SamplingParams(max_new_tokens=8)
    plain = generate(model, tok, PROMPTS, params, batch_size=2)
    with steer(model, v, 0.0):
        assert generate(model, tok, PROMPTS, params, batch_size=2) == plain
    ids = encode_prompts(tok, PROMPTS)

    def tokens():
        return [
            s[0].token_ids
            for s in sample(model, ids, params, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id, batch_size=2)
        ]

    base = tokens()
    with steer(model, v, 1.0, "generated"):
        gen = tokens()
    with steer(model, v, 1.0, "all"):
        both = tokens()
    # the first token comes from the prefill's logits, which "generated" leaves alone
    assert [t[0] for t in gen] == [t[0] for t in base]
    assert gen != base and both != base


def test_hooks_are_removed_on_error_and_bad_arguments_are_named(model, tok):
    ids = torch.tensor(encode_prompts(tok, PROMPTS[:1]))
    blocks, trunk = transformer_blocks(model), model.model
    before = [len(b._forward_hooks) for b in blocks], len(trunk._forward_pre_hooks)
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    with pytest.raises(RuntimeError, match="boom"), steer(model, {1: unit_vector(32)}, 3.0, "prompt"):
        assert len(trunk._forward_pre_hooks) == before[1] + 1  # the prefill / decoding-step detector
        raise RuntimeError("boom")
    assert ([len(b._forward_hooks) for b in blocks], len(trunk._forward_pre_hooks)) == before
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, clean)
    with pytest.raises(ValueError, match="blocks 0..1"), steer(model, {2: unit_vector(32)}, 1.0):
        pass
    with pytest.raises(ValueError, match="hidden size is 32"), steer(model, {0: torch.ones(8)}, 1.0):
        pass
    with pytest.raises(ValueError, match="positions='decode'"), steer(model, {0: unit_vector(32)}, 1.0, "decode"):
        pass


# ---------------------------------------------------------------------------------------------
# User mistakes: clear errors that name the layer, file or option (a review found raw tracebacks)


@pytest.mark.parametrize("layers", [[5], [-1], [0, 2]])
def test_a_layer_outside_the_model_names_the_layer_block_count_and_range(model, tok, layers):
    with pytest.raises(ConfigError) as err:
        hidden_states(model, tok, ["hello"], layers)
    bad = [l for l in layers if not 0 <= l < 2]
    msg = str(err.value)
    assert f"layer {bad[0]} is out of range" in msg and "has 2 decoder blocks" in msg and "blocks 0..1" in msg, msg
    assert "Pick layers from 0 to 1" in msg


def _good_vectors(model, path):
    vectors = {0: unit_vector(32), 1: unit_vector(32, seed=4)}
    save_vectors(path, vectors, {"fingerprint": steering_fingerprint(model), "method": "mean_diff", "source": "test"})
    return vectors


def _write_tensors(tensors):
    def damage(d):
        from safetensors.torch import save_file

        save_file(tensors, str(d / "steering.safetensors"))

    return damage


def _nan_at(i):
    v = unit_vector(32).clone()
    v[i] = float("nan")
    return v


DAMAGE = {  # name: (how to damage a good steering directory, file named, what the message says)
    "missing json": (lambda d: (d / "steering.json").unlink(), "steering.json", "not found"),
    "broken json": (lambda d: (d / "steering.json").write_text('{"fingerprint": {'), "steering.json", "not valid JSON"),
    "json not an object": (
        lambda d: (d / "steering.json").write_text("[0, 1]"),
        "steering.json",
        "expected a JSON object",
    ),
    "truncated safetensors": (
        lambda d: (d / "steering.safetensors").write_bytes((d / "steering.safetensors").read_bytes()[:-9]),
        "steering.safetensors",
        "not a readable safetensors file",
    ),
    "garbage safetensors": (
        lambda d: (d / "steering.safetensors").write_bytes(b"\x00garbage" * 5),
        "steering.safetensors",
        "not a readable safetensors file",
    ),
    "missing layer": (_write_tensors({"layer.0": unit_vector(32)}), "steering.json", "no vector for layer 1"),
    "layer beyond the model": (
        _write_tensors({"layer.0": unit_vector(32), "layer.5": unit_vector(32)}),
        "steering.safetensors",
        "vector for layer 5, but the model has 2 decoder blocks",
    ),
    "foreign tensor": (
        _write_tensors({"layer.0": unit_vector(32), "bias": unit_vector(32)}),
        "steering.safetensors",
        "unexpected tensor 'bias'",
    ),
    "wrong width": (
        _write_tensors({"layer.0": torch.ones(16), "layer.1": unit_vector(32)}),
        "steering.safetensors",
        "vector for layer 0 has shape (16,)",
    ),
    "nan vector": (
        _write_tensors({"layer.0": unit_vector(32), "layer.1": _nan_at(3)}),
        "steering.safetensors",
        "vector for layer 1 holds NaN or infinite values (1 of 32)",
    ),
    "inf vector": (
        _write_tensors({"layer.0": torch.full((32,), float("inf")), "layer.1": unit_vector(32)}),
        "steering.safetensors",
        "vector for layer 0 holds NaN or infinite values (32 of 32)",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_steering_directory_names_the_file_the_problem_and_the_fix(model, tmp_path, case):
    damage, file, what = DAMAGE[case]
    d = tmp_path / "v"
    _good_vectors(model, d)
    load_vectors(d, model)  # intact, it loads
    damage(d)
    with pytest.raises(DataError) as err:
        load_vectors(d, model)
    msg = str(err.value)
    assert str(d / file) in msg and what in msg and "alignkit steer fit" in msg and f"--out {d}" in msg, msg


def test_a_missing_steering_directory_is_named(model, tmp_path):
    with pytest.raises(DataError) as err:
        load_vectors(tmp_path / "nowhere", model)
    assert f"{tmp_path / 'nowhere'}: no such directory" in str(err.value) and "alignkit steer fit" in str(err.value)
    assert isinstance(err.value, AlignkitError)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), -float("inf"), "many"])
def test_steer_refuses_a_non_finite_strength_or_vector(model, strength):
    with pytest.raises(ConfigError, match=r"^strength=") as err, steer(model, {0: unit_vector(32)}, strength):
        pass
    assert repr(strength) in str(err.value)
    with pytest.raises(ConfigError, match="--steer-strength=nan: the steering strength must be a finite number"):
        check_strength(float("nan"), "--steer-strength")
    assert check_strength("2.5", "--steer-strength") == 2.5
    with (
        pytest.raises(ConfigError, match="vector for layer 1 holds NaN"),
        steer(model, {0: unit_vector(32), 1: _nan_at(0)}, 1.0),
    ):
        pass


def test_a_sweep_refuses_non_finite_or_no_strengths(model, tok, tmp_path):
    from alignkit.eval.steering import check_sweep, steering_sweep

    assert check_sweep([0, "1", 2.5], "--steer-sweep") == [0.0, 1.0, 2.5]
    for bad in ([float("nan"), 1.0], [0.0, float("inf")]):
        with pytest.raises(
            ConfigError, match=r"^--steer-sweep=(nan|inf): the steering strength must be a finite number"
        ):
            check_sweep(bad, "--steer-sweep")
    with pytest.raises(ConfigError, match="--steer-sweep: no strengths given"):
        check_sweep([], "--steer-sweep")
    # the library call checks its strengths before it reads any vectors (the directory does not exist)
    with pytest.raises(ConfigError, match=r"strengths=nan"):
        steering_sweep(model, tok, str(tmp_path / "nowhere"), [0.0, float("nan")], questions=[])
