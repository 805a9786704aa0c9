"""Vision-language models (issue 33): images in prompts through the processor, on tiny random-init
LLaVA and Idefics3 models built from config."""

import json
import random

import pytest
import torch
from conftest import base_overrides, crash_after, write_jsonl
from PIL import Image

from alignkit.config import ModelConfig, load_config
from alignkit.data.batching import collate_packed_groups, collate_pairs, collate_sft
from alignkit.data.formats import load_preference_examples, load_sft_examples
from alignkit.data.tokenize import tokenize_pairs, tokenize_sft
from alignkit.errors import ConfigError, DataError, ModelError
from alignkit.logprobs import segment_logps
from alignkit.models import apply_lora, load_model, load_tokenizer, vision_part
from alignkit.testing import VLM_FAMILIES, save_tiny_vlm_dir
from alignkit.train import checkpoint as ckpt
from alignkit.train import loop
from alignkit.train.metrics import read_metrics

COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 30), rgb).save(root / f"{name}.png")
    return root, {fam: save_tiny_vlm_dir(root / fam, fam) for fam in VLM_FAMILIES}


def image_prompt(name: str, question: str = "what is the sky ?") -> list:
    return [
        {"role": "user", "content": [{"type": "image", "image": f"{name}.png"}, {"type": "text", "text": question}]}
    ]


def colour_pairs(n: int, seed: int = 0) -> list:
    """The reply names the image's colour: visible only in the image."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        right, wrong = rng.sample(["red", "blue"], 2)
        rows.append({"prompt": image_prompt(right), "chosen": right, "rejected": wrong})
    return rows


def assert_same_weights(dir_a, dir_b, atol: float) -> None:
    """The two model directories hold the same tensors (names and values within `atol`)."""
    from safetensors.torch import load_file

    a, b = load_file(str(dir_a / "model.safetensors")), load_file(str(dir_b / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def _tok(model_dir):
    return load_tokenizer(ModelConfig(name_or_path=str(model_dir)))


def _model(model_dir):
    return load_model(ModelConfig(name_or_path=str(model_dir), device="cpu"), for_training=False).eval()


# -- records ------------------------------------------------------------------------------------


def test_image_forms_parse_and_load(vlm_dirs):
    root, dirs = vlm_dirs
    png = (root / "red.png").read_bytes()
    rows = [
        {"prompt": image_prompt("red"), "chosen": "red", "rejected": "blue"},  # a path in a part
        {"prompt": "what is the sky ?", "images": ["blue.png"], "chosen": "blue", "rejected": "red"},  # column
        {"prompt": image_prompt("x"), "chosen": "red", "rejected": "blue"},
    ]
    rows[2]["prompt"][0]["content"][0] = {"type": "image", "image": {"bytes": None, "path": str(root / "green.png")}}
    path = write_jsonl(root / "forms.jsonl", rows)
    examples = load_preference_examples(str(path)).examples
    assert not examples[1].plain_text  # the string prompt became parts: the template renders it
    part = examples[1].prompt[0]["content"]
    assert part[0] == {"type": "image", "image": str(root / "blue.png")}  # read from the file's folder
    assert part[1] == {"type": "text", "text": "what is the sky ?"}
    items, _ = tokenize_pairs(examples, _tok(dirs["llava"]), 256)
    # the three images are red, blue and green: their pixels differ
    pixels = [it.vision.tensors["pixel_values"] for it in items]
    assert all(not torch.equal(a, b) for a, b in [(pixels[0], pixels[1]), (pixels[1], pixels[2])])
    # bytes (a `datasets` Image value read from Parquet) give the same pixels as the file
    from alignkit.data.vision import load_image

    assert load_image(png, "x.jsonl:1", 0).tobytes() == load_image(str(root / "red.png"), "x.jsonl:1", 0).tobytes()


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": image_prompt("missing"), "chosen": "a", "rejected": "b"},
            r"bad\.jsonl:1: image 0 .*missing\.png not found",
        ),
        (
            {"prompt": "hi", "images": ["red.png", "blue.png"], "chosen": "a", "rejected": "b", "_parts": 1},
            "holds 2 images",
        ),
        (
            {"prompt": "hi", "chosen": [{"role": "assistant", "content": [{"type": "image"}]}], "rejected": "b"},
            "prompt messages only",
        ),
        (
            {"prompt": [{"role": "user", "content": [{"type": "video"}]}], "chosen": "a", "rejected": "b"},
            "part 0 of message 0",
        ),
        ({"prompt": image_prompt("https://x.org/a"), "chosen": "a", "rejected": "b"}, "is a URL"),
        (
            {"prompt": image_prompt("red"), "images": ["blue.png"], "chosen": "a", "rejected": "b"},
            "give each image once",
        ),
        ({"prompt": image_prompt("garbage"), "chosen": "a", "rejected": "b"}, "cannot be read as an image"),
    ],
)
def test_bad_images_are_errors_naming_the_record(vlm_dirs, tmp_path, row, message):
    root, dirs = vlm_dirs
    (tmp_path / "garbage.png").write_bytes(b"not a png")
    for name in COLOURS:
        (tmp_path / f"{name}.png").write_bytes((root / f"{name}.png").read_bytes())
    if row.pop("_parts", None):  # two images for one payload-less part
        row["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    if "https" in json.dumps(row):
        row["prompt"][0]["content"][0]["image"] = "https://x.org/a.png"
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=message):
        examples = load_preference_examples(str(path)).examples
        tokenize_pairs(examples, _tok(dirs["llava"]), 256)


def test_images_need_a_vision_language_model(vlm_dirs, tiny_model_dir, tmp_path):
    root, _ = vlm_dirs
    path = write_jsonl(root / "one.jsonl", [{"prompt": image_prompt("red"), "chosen": "red", "rejected": "blue"}])
    with pytest.raises(DataError, match="model is text-only"):
        tokenize_pairs(load_preference_examples(str(path)).examples, _tok(tiny_model_dir), 256)


# -- token counts and truncation --------------------------------------------------------------


@pytest.mark.parametrize("family, image_tokens", [("llava", 4), ("idefics3", 4)])
def test_images_count_with_the_processors_tokens(vlm_dirs, family, image_tokens):
    root, dirs = vlm_dirs
    tok = _tok(dirs[family])
    image_id = tok.convert_tokens_to_ids("<image>")
    rows = [
        {"prompt": "what is the sky ?", "chosen": "red", "rejected": "blue"},
        {"prompt": "what is the sky ?", "images": ["red.png"], "chosen": "red", "rejected": "blue"},
        {"prompt": "what is the sky ?", "images": ["red.png", "blue.png"], "chosen": "red", "rejected": "blue"},
    ]
    items, _ = tokenize_pairs(
        load_preference_examples(str(write_jsonl(root / f"n-{family}.jsonl", rows))).examples, tok, 256
    )
    counts = [it.prompt_ids.count(image_id) for it in items]
    assert counts == [0, image_tokens, 2 * image_tokens]
    extra = {"llava": 0, "idefics3": 3}[family]  # Idefics3 wraps each image: <fake><global-img>...<fake>
    assert len(items[2].prompt_ids) - len(items[1].prompt_ids) == len(items[1].prompt_ids) - len(items[0].prompt_ids)
    assert len(items[1].prompt_ids) - len(items[0].prompt_ids) == image_tokens + extra
    assert items[0].vision is None and items[2].vision.num_images == 2


def test_truncation_never_cuts_a_prompt_with_images(vlm_dirs):
    root, dirs = vlm_dirs
    tok = _tok(dirs["llava"])
    long = " ".join(["red"] * 40)
    rows = [{"prompt": image_prompt("red"), "completion": long}]
    ex = load_sft_examples(str(write_jsonl(root / "long.jsonl", rows))).examples
    (item,), stats = tokenize_sft(ex, tok, 24)
    assert item.truncated and stats.truncated == 1
    assert len(item.prompt_ids) == 14 and len(item.prompt_ids) + len(item.completion_ids) == 24  # the reply was cut
    with pytest.raises(DataError, match=r"long\.jsonl:1: the prompt is 14 tokens with its 1 image"):
        tokenize_sft(ex, tok, 14)


# -- log-probs: layouts agree, and the image matters ------------------------------------------


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_padded_and_prefix_shared_layouts_equal_one_example_at_a_time(vlm_dirs, family):
    root, dirs = vlm_dirs
    tok, model = _tok(dirs[family]), _model(dirs[family])
    rows = [
        {"prompt": image_prompt("red"), "chosen": "red", "rejected": "blue"},
        {
            "prompt": "what is the sky ? and this",
            "images": ["blue.png", "green.png"],
            "chosen": "blue sky",
            "rejected": "the green earth",
        },
        {"prompt": "hello world", "chosen": "hello", "rejected": "no"},  # no image in the batch's middle
        {"prompt": image_prompt("green"), "chosen": "green", "rejected": "red"},
    ]
    items, _ = tokenize_pairs(
        load_preference_examples(str(write_jsonl(root / f"l-{family}.jsonl", rows))).examples, tok, 256
    )
    with torch.no_grad():
        single = torch.stack(
            [segment_logps(model, collate_pairs([it], tok.pad_token_id)).logps for it in items]
        )  # [4, 2]
        padded = segment_logps(model, collate_pairs(items, tok.pad_token_id)).logps.view(2, -1).T
        batch = collate_packed_groups(items, tok.pad_token_id, 64)
        shared = segment_logps(model, batch).logps.view(2, -1).T
    assert batch.packed and batch.shared_tokens == sum(len(it.prompt_ids) for it in items)  # one copy of each prompt
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared, single, atol=1e-5, rtol=0)
    # the image is read: the same text with another image scores differently
    other = [{"prompt": image_prompt("blue"), "chosen": "red", "rejected": "blue"}]
    (it2,), _ = tokenize_pairs(
        load_preference_examples(str(write_jsonl(root / f"o-{family}.jsonl", other))).examples, tok, 256
    )
    with torch.no_grad():
        changed = segment_logps(model, collate_pairs([it2], tok.pad_token_id)).logps
    assert (changed - single[0]).abs().max() > 1e-4


def test_sft_log_probs_equal_a_plain_forward(vlm_dirs):
    root, dirs = vlm_dirs
    tok, model = _tok(dirs["llava"]), _model(dirs["llava"])
    ex = load_sft_examples(
        str(write_jsonl(root / "s.jsonl", [{"prompt": image_prompt("red"), "completion": "red sky"}]))
    ).examples
    (item,), _ = tokenize_sft(ex, tok, 64)
    with torch.no_grad():
        ours = float(segment_logps(model, collate_sft([item], tok.pad_token_id)).logps[0])
        ids = torch.tensor([item.prompt_ids + item.completion_ids])
        logits = model(input_ids=ids, **item.vision.tensors).logits[0].double().log_softmax(-1)
    n = len(item.prompt_ids)
    want = sum(float(logits[n + j - 1, t]) for j, t in enumerate(item.completion_ids))
    assert ours == pytest.approx(want, abs=1e-4)


# -- models: freezing, LoRA targets -----------------------------------------------------------


def test_vision_tower_frozen_by_default_and_lora_on_the_language_model(vlm_dirs, tiny_model_dir):
    _, dirs = vlm_dirs
    model = load_model(ModelConfig(name_or_path=str(dirs["llava"]), device="cpu"))
    assert not any(p.requires_grad for p in vision_part(model, "vision").parameters())
    assert all(p.requires_grad for p in vision_part(model, "projector").parameters())
    trained = load_model(ModelConfig(name_or_path=str(dirs["llava"]), device="cpu", train_vision=True))
    assert all(p.requires_grad for p in vision_part(trained, "vision").parameters())
    from alignkit.config import LoraConfig

    lora = apply_lora(
        load_model(ModelConfig(name_or_path=str(dirs["llava"]), device="cpu")), LoraConfig(enabled=True, r=2)
    )
    adapted = {n.split(".lora_A")[0] for n, _ in lora.named_parameters() if "lora_A" in n}
    assert adapted and all("language_model" in n for n in adapted)
    assert not any("lm_head" in n for n in adapted)
    both = apply_lora(
        load_model(ModelConfig(name_or_path=str(dirs["idefics3"]), device="cpu")),
        LoraConfig(enabled=True, r=2, vision_parts=["projector", "vision"]),
    )
    names = {n for n, _ in both.named_parameters() if "lora_A" in n}
    assert any("connector" in n for n in names) and any("vision_model" in n for n in names)
    with pytest.raises(ConfigError, match="train_vision` has no effect"):
        load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", train_vision=True))
    # a reward model: the tower frozen too; LoRA on the language model, the new score head trained whole
    reward = load_model(ModelConfig(name_or_path=str(dirs["llava"]), device="cpu"), reward_names=["r"], pad_token_id=1)
    assert not any(p.requires_grad for p in vision_part(reward, "vision").parameters())
    reward = apply_lora(reward, LoraConfig(enabled=True, r=2))
    trainable = {n for n, p in reward.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("language_model" in n for n in trainable)
    assert all("score" in n or ("language_model" in n and "lora_" in n) for n in trainable), trainable


def test_mrope_models_are_refused_with_the_reason():
    from alignkit.data.vision import check_architecture

    with pytest.raises(ModelError, match="M-RoPE"):
        check_architecture("qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct")


# -- training ---------------------------------------------------------------------------------


def _run(model_dir, data, tmp_path, out, *extra):
    return load_config(
        None,
        base_overrides(model_dir, data, tmp_path / out, tmp_path / "cache")
        + ["model.device=cpu", "data.eval_fraction=0", "train.batch_size=4", "train.warmup_ratio=0", *extra],
    )


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_dpo_learns_what_only_the_image_shows(vlm_dirs, tmp_path, family):
    root, dirs = vlm_dirs
    data = write_jsonl(root / f"train-{family}.jsonl", colour_pairs(16))
    cfg = _run(dirs[family], data, tmp_path, "dpo", "recipe=dpo", "train.max_steps=24", "train.learning_rate=5e-3")
    result = loop.train(cfg, progress=False)
    losses = [r["loss"] for r in read_metrics(result.run_dir, "train")]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.05, losses
    # held out: both orders of each colour; the trained model prefers the reply naming the image's colour
    held = [{"prompt": image_prompt(c), "chosen": c, "rejected": w} for c, w in [("red", "blue"), ("blue", "red")]]
    tok = _tok(result.final_dir)
    items, _ = tokenize_pairs(
        load_preference_examples(str(write_jsonl(root / f"held-{family}.jsonl", held))).examples, tok, 64
    )
    with torch.no_grad():
        before = segment_logps(_model(dirs[family]), collate_pairs(items, tok.pad_token_id)).logps.view(2, -1)
        after = segment_logps(_model(result.final_dir), collate_pairs(items, tok.pad_token_id)).logps.view(2, -1)
    margin = lambda t: t[0] - t[1]  # noqa: E731  chosen - rejected, per held-out pair
    assert (margin(after) - margin(before)).min() > 0
    # final/ loads back with the auto classes, processor included; the vision tower did not train
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert type(AutoProcessor.from_pretrained(result.final_dir)).__name__.lower().startswith(family)
    reloaded = AutoModelForImageTextToText.from_pretrained(result.final_dir)
    start = load_file(str(dirs[family] / "model.safetensors"))
    end = reloaded.state_dict()
    vision_keys = [k for k in start if "vision" in k]
    assert vision_keys and all(torch.equal(start[k], end[k]) for k in vision_keys if k in end)


def _full_and_resumed(model_dir, data, tmp_path, monkeypatch, steps: list):
    """The uninterrupted run, and the same run crashed right after checkpoint 2 and resumed."""
    full = loop.train(_run(model_dir, data, tmp_path, "full", *steps), progress=False)
    real_save = crash_after(monkeypatch, 2)
    cfg = _run(model_dir, data, tmp_path, "crashed", *steps)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, progress=False)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    return full, loop.train(cfg, resume=True, progress=False)


def test_sft_resume_after_crash_equals_the_uninterrupted_run(vlm_dirs, tmp_path, monkeypatch):
    root, dirs = vlm_dirs
    rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in colour_pairs(12, seed=1)]
    data = write_jsonl(root / "sft.jsonl", rows)
    steps = ["recipe=sft", "train.max_steps=4", "train.save_every=2", "train.learning_rate=5e-3"]
    full, resumed = _full_and_resumed(dirs["idefics3"], data, tmp_path, monkeypatch, steps)
    a, b = read_metrics(full.run_dir, "train"), read_metrics(resumed.run_dir, "train")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
    assert_same_weights(full.final_dir, resumed.final_dir, atol=1e-6)


@pytest.mark.parametrize("recipe", ["dpo", "reward"])
def test_two_processes_train_what_one_process_trains(vlm_dirs, tmp_path, recipe):
    """FSDP2 over 2 processes (the language model's blocks sharded one by one, the vision tower and
    projector with the root) trains the steps that one process trains: a policy (DPO) and a reward
    model (the family's classifier)."""
    from conftest import torchrun

    root, dirs = vlm_dirs
    data = write_jsonl(root / "pairs-2proc.jsonl", colour_pairs(16, seed=2))  # beside the images

    def args(out, batch):
        return base_overrides(dirs["llava"], data, tmp_path / out, tmp_path / f"cache-{out}") + [
            f"recipe={recipe}",
            "data.eval_fraction=0",
            "train.max_steps=3",
            f"train.batch_size={batch}",
            "train.learning_rate=1e-2",
            "train.warmup_ratio=0",
            "train.log_every=1",
        ]

    proc = torchrun([{"argv": ["train", *args("two", 2)]}], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one = loop.train(load_config(None, args("one", 4)), progress=False)
    a, b = read_metrics(one.run_dir, "train"), read_metrics(tmp_path / "two", "train")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
        assert rb["tokens"] == ra["tokens"]
    # The losses agree within 1e-5 at every step (a misplaced image would move them by far more). The
    # reward model's weights differ by up to 8e-5 after 3 steps at lr 1e-2 (measured; the losses by
    # 4e-7): its gradient grows 6x in step 2, and Adam's per-weight normalisation turns the two
    # layouts' float32 rounding into update differences where a weight's gradients change sign.
    assert_same_weights(one.final_dir, tmp_path / "two" / "final", atol=1e-5 if recipe == "dpo" else 2e-4)


# -- online: GRPO samples with the images in its prompts ----------------------------------------

COLOUR_REWARD = '''
def reward(prompts, completions, colour, **columns):
    """+1 for naming the image's colour, -1 for naming the other one."""
    other = {"red": "blue", "blue": "red"}
    return [float(c in text.split()) - float(other[c] in text.split()) for text, c in zip(completions, colour)]
'''


def test_grpo_learns_what_only_the_image_shows(vlm_dirs, tmp_path):
    root, dirs = vlm_dirs
    rows = [{"prompt": image_prompt(c), "colour": c} for c in ["red", "blue"] * 8]
    data = write_jsonl(root / "colour_prompts.jsonl", rows)
    (tmp_path / "colour.py").write_text(COLOUR_REWARD)
    cfg = _run(
        dirs["llava"],
        data,
        tmp_path,
        "grpo",
        "recipe=grpo",
        f"online.rewards={tmp_path / 'colour.py'}:reward",
        "generation.num_samples=8",
        "generation.max_new_tokens=4",
        "generation.temperature=1.0",
        "train.max_steps=30",
        "train.learning_rate=3e-2",
    )
    result = loop.train(cfg, progress=False)
    rewards = [r["reward"] for r in read_metrics(result.run_dir, "train")]
    assert sum(rewards[-6:]) / 6 > sum(rewards[:6]) / 6 + 0.1, rewards


def test_the_sampler_never_draws_image_layout_tokens(vlm_dirs):
    from alignkit.data.tokenize import render_prompt
    from alignkit.data.vision import PixelPrompt, vision_of
    from alignkit.generation.decode import SamplingParams, sample

    root, dirs = vlm_dirs
    tok, model = _tok(dirs["idefics3"]), _model(dirs["idefics3"])
    banned = vision_of(tok).layout_ids
    assert {tok.convert_ids_to_tokens(i) for i in banned} == {"<image>", "<fake_token_around_image>", "<global-img>"}
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)  # an image token outscores all
    with torch.no_grad():
        model.lm_head.weight.copy_(head.weight)
        model.lm_head.bias.zero_()
        model.lm_head.bias[banned[0]] = 100.0
    messages = tuple(image_prompt("red"))
    vision = vision_of(tok)
    ids, pixels = vision.encode_prompt(render_prompt(tok, messages, False), messages, f"{root / 't.jsonl'}:1")
    params = SamplingParams(max_new_tokens=3, temperature=0.0)
    free = sample(model, [PixelPrompt(ids, pixels)], params, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert free[0][0].token_ids[0] == banned[0]  # without the tokenizer, nothing is banned
    ((s,),) = sample(
        model, [PixelPrompt(ids, pixels)], params, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id, tokenizer=tok
    )
    assert not set(s.token_ids) & set(banned) and len(s.token_ids) == 3
    # processed log-probs with the ban in the settings: of the distribution without those tokens
    ((p,),) = sample(
        model,
        [PixelPrompt(ids, pixels)],
        params.but(temperature=1.0, logprobs="processed", banned=banned),
        eos_ids=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        tokenizer=tok,
        seed=3,
    )
    with torch.no_grad():
        x = torch.tensor([ids + p.token_ids])
        logits = model(input_ids=x, attention_mask=torch.ones_like(x), **pixels.tensors).logits[0].float()
    logits[:, list(banned)] = float("-inf")
    own = torch.log_softmax(logits, -1)[[len(ids) - 1 + j for j in range(3)], p.token_ids]
    assert p.logprobs == pytest.approx(own.tolist(), abs=1e-5)


def test_banned_tokens_travel_to_sampling_servers():
    """A server samples with the ban (vLLM's server by logit bias; `alignkit sample-serve` reads
    the same bias back as `SamplingParams.banned`), and takes no other bias."""
    from alignkit.generation.decode import SamplingParams
    from alignkit.generation.sampler_server import request_params
    from alignkit.generation.vllm_engine import _wire_params

    params = SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=20, n=2, banned=(7, 5))
    body = _wire_params(params)
    assert body["logit_bias"] == {"7": -100.0, "5": -100.0}
    back = request_params({**body, "logprobs_mode": "processed"})
    assert back == params.but(banned=(5, 7), logprobs="processed")
    assert "logit_bias" not in _wire_params(params.but(banned=()))
    with pytest.raises(ValueError, match="only bans"):
        request_params({**body, "logit_bias": {"5": 3.0}})


def test_online_image_prompts_refuse_what_does_not_carry_pixels_yet(vlm_dirs, tmp_path):
    root, dirs = vlm_dirs
    data = write_jsonl(root / "p.jsonl", [{"prompt": image_prompt("red"), "colour": "red"}] * 4)
    (tmp_path / "colour.py").write_text(COLOUR_REWARD)
    cfg = _run(
        dirs["llava"],
        data,
        tmp_path,
        "bad",
        "recipe=grpo",
        f"online.rewards={tmp_path / 'colour.py'}:reward",
        "generation.sampler_server=http://127.0.0.1:9",
        "train.max_steps=1",
    )
    with pytest.raises(ConfigError, match=r"prompts hold images.*remove generation.sampler_server"):
        loop.train(cfg, progress=False)


def test_one_step_off_with_images_resumes_exactly(vlm_dirs, tmp_path, monkeypatch):
    """One step off in the training process (a copy of the policy samples the next rollout, images
    included, while the trainer trains): a crash after checkpoint 2 and a resume train what the
    uninterrupted run trains, the rollout in flight stored with its pixels."""
    root, dirs = vlm_dirs
    rows = [{"prompt": image_prompt(c), "colour": c} for c in ["red", "blue"] * 8]
    data = write_jsonl(root / "colour_prompts_async.jsonl", rows)
    (tmp_path / "colour.py").write_text(COLOUR_REWARD)
    steps = [
        "recipe=grpo",
        f"online.rewards={tmp_path / 'colour.py'}:reward",
        "online.async.mode=one_step_off",
        "generation.num_samples=4",
        "generation.max_new_tokens=3",
        "generation.temperature=1.0",
        "train.max_steps=4",
        "train.save_every=2",
        "train.learning_rate=2e-2",
    ]
    full, resumed = _full_and_resumed(dirs["idefics3"], data, tmp_path, monkeypatch, steps)
    assert [r["async/staleness_mean"] for r in read_metrics(full.run_dir, "train")] == [0, 1, 1, 1]
    a, b = read_metrics(full.run_dir, "train"), read_metrics(resumed.run_dir, "train")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["reward"] for r in a] == [r["reward"] for r in b]
    assert_same_weights(full.final_dir, resumed.final_dir, atol=1e-6)


def _family_rows(recipe: str) -> list:
    pairs = colour_pairs(16, seed=3)
    if recipe == "unpaired":  # thumbs up for the right colour, down for the wrong one
        return [
            {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs
            for side in ("chosen", "rejected")
        ]
    if recipe == "masked":  # the colour sentence is the scored one on each side
        return [
            {
                "prompt": p["prompt"],
                "chosen_sentences": [{"text": p["chosen"], "correct": True}, {"text": " sky", "correct": True}],
                "rejected_sentences": [{"text": p["rejected"], "correct": False}, {"text": " sky", "correct": True}],
            }
            for p in pairs
        ]
    if recipe == "negative":  # D2O: the wrong colour is the bad reply; the model's own samples the others
        return [{"prompt": p["prompt"], "rejected": p["rejected"]} for p in pairs]
    return pairs


@pytest.mark.parametrize(
    "recipe, loss",
    [
        ("dpo", "simpo"),
        ("dpo", "orpo"),
        ("unpaired", "kto"),
        ("masked", "mask_dpo"),
        ("dpo", "ipo"),
        ("negative", "d2o"),
    ],
)
def test_the_dpo_family_trains_on_images(vlm_dirs, tmp_path, recipe, loss):
    root, dirs = vlm_dirs
    data = write_jsonl(root / f"family-{recipe}-{loss}.jsonl", _family_rows(recipe))
    cfg = _run(
        dirs["llava"],
        data,
        tmp_path,
        loss,
        f"recipe={recipe}",
        f"loss.name={loss}",
        "train.max_steps=12",
        "train.learning_rate=5e-3",
        *(["generation.num_samples=2", "generation.max_new_tokens=4"] if recipe == "negative" else []),
    )
    result = loop.train(cfg, progress=False)
    losses = [r["loss"] for r in read_metrics(result.run_dir, "train")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_d2o_samples_with_the_images_and_keys_its_cache_by_their_pixels(vlm_dirs, tmp_path):
    """D2O's negative records take images (either form); its samples come from the prompts with
    their images, and the sample cache's key changes when an image's pixels do (same path)."""
    from alignkit.data.negative import load_negative_examples, sampling_prompt, tokenize_groups
    from alignkit.generation.cache import samples_key
    from alignkit.generation.decode import SamplingParams

    root, dirs = vlm_dirs
    rows = [{"prompt": "what is the sky ?", "images": ["red.png"], "rejected": "blue"}]
    (ex,) = load_negative_examples(str(write_jsonl(root / "neg.jsonl", rows))).examples
    tok = _tok(dirs["idefics3"])
    prompt = sampling_prompt(tok, ex)
    assert isinstance(prompt, list) and prompt[0]["content"][0]["type"] == "image"
    (group,), _ = tokenize_groups([ex], [["red", "green"]], tok, 128)
    assert group.vision is not None and group.vision.num_images == 1 and len(group.completions) == 3
    image = tmp_path / "img.png"
    key = lambda: samples_key(
        {"m": 1}, SamplingParams(), 0, [[{**prompt[0], "content": [{"type": "image", "image": str(image)}]}]]
    )  # noqa: E731
    Image.new("RGB", (8, 8), (255, 0, 0)).save(image)
    red = key()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(image)
    assert key() != red and key() == key()


def test_eval_and_generate_take_image_prompts_and_the_report_shows_them(vlm_dirs, tmp_path, capsys):
    from alignkit.cli import main

    root, dirs = vlm_dirs
    data = write_jsonl(root / "eval-pairs.jsonl", colour_pairs(12, seed=4))
    (tmp_path / "colour.py").write_text(
        COLOUR_REWARD
        + "\n\ndef says_red(prompts, completions, **c):\n    return [float('red' in t) for t in completions]\n"
    )
    cfg = _run(dirs["llava"], data, tmp_path, "run", "recipe=dpo", "train.max_steps=2", "data.eval_fraction=0.25")
    loop.train(cfg, progress=False)
    argv = ["eval", "--run", str(tmp_path / "run"), "--reward", f"{tmp_path / 'colour.py'}:says_red"]
    assert main(argv + ["--num-prompts", "2", "--max-new-tokens", "3", "--no-progress"]) == 0
    m = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert m["n_pairs"] == 3 and 0 <= m["preference"]["implicit_reward_accuracy"]["value"] <= 1
    examples = m["generation"]["examples"]
    assert examples and all(x["images"][0].startswith("data:image/png;base64,") for x in examples)
    report = (tmp_path / "run" / "report.html").read_text()
    assert report.count('<img class="thumb"') == len(examples)
    # generate: best-of-n on image prompts; a strategy with its own forward passes is refused
    prompts = write_jsonl(
        root / "gen-prompts.jsonl", [{"prompt": image_prompt(c), "colour": c} for c in ("red", "blue")]
    )
    out = tmp_path / "gen.jsonl"
    common = [
        "generate",
        "--model",
        str(dirs["llava"]),
        "--prompts",
        str(prompts),
        "--reward",
        f"{tmp_path / 'colour.py'}:reward",
    ]
    assert main(common + ["--strategy", "best-of-n", "--n", "2", "--max-new-tokens", "3", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["candidates"]) == 2 for r in rows)
    capsys.readouterr()
    assert main(common + ["--strategy", "deal", "--max-new-tokens", "3"]) == 2
    assert "the prompts hold images" in capsys.readouterr().err


# -- reward and value models on a vision-language trunk -----------------------------------------


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_reward_model_learns_what_only_the_image_shows(vlm_dirs, tmp_path, family):
    """`recipe: reward` on a VLM: the family's sequence classifier (registered with
    AutoModelForSequenceClassification) learns a preference only the image decides; the packed
    layout's rewards equal the padded classifier's; `final/` scores as a reward wherever one is taken."""
    from alignkit.heads import sequence_rewards
    from alignkit.rewards.model import RewardModel

    root, dirs = vlm_dirs
    data = write_jsonl(root / f"rm-{family}.jsonl", colour_pairs(16))
    cfg = _run(dirs[family], data, tmp_path, "rm", "recipe=reward", "train.max_steps=20", "train.learning_rate=5e-3")
    result = loop.train(cfg, progress=False)
    losses = [r["loss"] for r in read_metrics(result.run_dir, "train")]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.1, losses

    rm = RewardModel(result.final_dir, device="cpu")
    assert type(rm.model).__name__ == {"llava": "Llava", "idefics3": "Idefics3"}[family] + "ForSequenceClassification"
    prompts = [image_prompt("red"), image_prompt("red"), image_prompt("blue"), image_prompt("blue")]
    prompts = [
        [
            {
                **m,
                "content": [
                    {**p, "image": str(root / p["image"])} if p["type"] == "image" else p for p in m["content"]
                ],
            }
            for m in pr
        ]
        for pr in prompts
    ]
    r = rm(prompts, ["red", "blue", "red", "blue"])
    assert r[0] > r[1] and r[3] > r[2], r  # the colour the image shows scores higher, for both images

    # the same held-out pairs laid out packed and padded give the classifier's own scores
    held = [{"prompt": image_prompt(c), "chosen": c, "rejected": w} for c, w in [("red", "blue"), ("blue", "red")]]
    items, _ = tokenize_pairs(
        load_preference_examples(str(write_jsonl(root / f"rm-held-{family}.jsonl", held))).examples, rm.tokenizer, 64
    )
    pad = rm.tokenizer.pad_token_id
    with torch.no_grad():
        padded = sequence_rewards(rm.model, collate_pairs(items, pad), pad)
        packed = sequence_rewards(rm.model, collate_packed_groups(items, pad, 256), pad)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[:, 0], torch.tensor([r[0], r[3], r[1], r[2]]), atol=1e-5, rtol=0)

    # `alignkit eval --reward` scores pairs with images by the reward model (its accuracy, length bias)
    from alignkit.cli import main

    out = tmp_path / "eval"
    argv = ["eval", "--model", str(dirs[family]), "--data", str(data), "--reward", str(result.final_dir)]
    assert main(argv + ["--num-prompts", "0", "--output-dir", str(out), "--no-report", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_pairs"] == 16 and m["length_bias"]["reward"] == "reward_model"
    assert m["preference"]["reward_accuracy"]["value"] > 0.5, m["preference"]["reward_accuracy"]


def test_prm_refuses_a_vision_language_model(vlm_dirs, tmp_path):
    root, dirs = vlm_dirs
    data = write_jsonl(root / "steps.jsonl", [{"prompt": "q", "completions": ["a"], "labels": [1]}])
    cfg = _run(dirs["llava"], data, tmp_path, "prm", "recipe=prm", "train.max_steps=1")
    with pytest.raises(ConfigError, match="recipe prm does not train on a vision-language model"):
        loop.train(cfg, progress=False)


def test_grpo_and_ppo_take_a_vision_language_reward_and_value_model(vlm_dirs, tmp_path):
    """A VLM reward model scores image prompts as `online.rewards` (GRPO), and PPO's value model
    is the policy's trunk with a value head, the pixels in its inputs."""
    root, dirs = vlm_dirs
    rm_data = write_jsonl(root / "rm-grpo.jsonl", colour_pairs(16))
    rm_cfg = _run(
        dirs["llava"], rm_data, tmp_path, "rm", "recipe=reward", "train.max_steps=20", "train.learning_rate=5e-3"
    )
    rm = loop.train(rm_cfg, progress=False).final_dir
    rows = [{"prompt": image_prompt(c)} for c in ["red", "blue"] * 4]
    data = write_jsonl(root / "prompts-rm.jsonl", rows)
    common = [f"online.rewards={rm}", "generation.num_samples=4", "generation.max_new_tokens=3", "train.max_steps=3"]
    for recipe in ("grpo", "ppo"):
        cfg = _run(dirs["llava"], data, tmp_path, recipe, f"recipe={recipe}", *common)
        result = loop.train(cfg, progress=False)
        metrics = read_metrics(result.run_dir, "train")
        assert len(metrics) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics)
        assert all(torch.isfinite(torch.tensor(r["reward"])) for r in metrics)
        if recipe == "grpo":  # three rollouts: the reward model's scores of different samples
            assert len({r["reward"] for r in metrics}) == 3, metrics
        else:
            assert all(torch.isfinite(torch.tensor(r["value_loss"])) for r in metrics), metrics[0].keys()
    # best-of-n with the reward model on image prompts
    from alignkit.cli import main

    out = tmp_path / "gen.jsonl"
    argv = ["generate", "--model", str(dirs["llava"]), "--prompts", str(data), "--reward", str(rm)]
    assert main(argv + ["--strategy", "best-of-n", "--n", "3", "--max-new-tokens", "3", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and all(len(set(r["candidate_rewards"])) == 3 for r in rows), rows[0]
    assert all(r["reward"] == max(r["candidate_rewards"]) for r in rows)
