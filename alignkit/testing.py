"""Tiny random-init models and a small tokenizer for tests and examples (no download needed).

The tokenizer is a word-level tokenizer with ChatML special tokens and template, built in
memory; the models are Llama- or Qwen2-style configs, by default two layers of width 32: about
26,000 parameters with the tokenizer's 122-token vocabulary.

The vocabulary is lower-case, so the principle judge's answers ("Yes", "No", "A", "B") are <unk>
and every judge score on it is 0. Tests that read a judge pass `extra_words=JUDGE_WORDS`: the
words take ids no other token has, so every other id stays as it is (and the default vocabulary,
which other tests' pinned numbers depend on, is unchanged).
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = (
    "the a an is are was what how why who when where which yes no not and or but of to in on for "
    "with as by at from this that it i you he she we they me my your answer question number sum "
    "plus minus times equals one two three four five six seven eight nine ten zero good bad "
    "helpful harmful sorry cannot help please thanks hello world cat dog sky blue red green "
    "capital city country france paris water fire earth sun moon tell me about explain write short "
    "long story poem code math . , ? ! : ' \""
).split()
JUDGE_WORDS = ("Yes", "No", "A", "B")  # the principle judge's options (alignkit.rewards.judge)


def tiny_tokenizer(chat_template: bool = True, extra_words: tuple = ()):
    """A word-level tokenizer over WORDS plus digits, with ChatML special tokens; `extra_words` get
    ids no other token has (the ids of the others do not change)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {
        tok: i
        for i, tok in enumerate(specials + WORDS + [str(d) for d in range(10)] + ["user", "assistant", "system", "\n"])
    }
    # WORDS repeats "me", which leaves one id unused: the extra words fill it first and then follow
    # the last id, so the ids run 0..len-1 and len(tokenizer) stays a model's vocabulary size
    free = [i for i in range(len(vocab) + 1) if i not in set(vocab.values())]
    for word in extra_words:
        if word not in vocab:
            vocab[word] = free.pop(0) if free else len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(),
        ]
    )
    tk.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(
    family: str = "llama",
    vocab_size: int = 256,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    init_std: float | None = None,
):
    """A random-init causal LM of the given family ("llama" or "qwen2"). `init_std`: the std of the
    weights' normal init (the config's `initializer_range`; None: transformers' 0.02). At 0.02 the
    next-token distribution hardly depends on the context; ~0.2 makes it do so, as a judge's must."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = _decoder_settings(vocab_size, hidden, layers)
    if init_std is not None:
        common["initializer_range"] = init_std
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _decoder_settings(vocab_size: int, hidden: int, layers: int) -> dict:
    """The tiny decoder's config settings (4 heads, 2 KV heads; the tokenizer's pad and end ids)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=1,
        eos_token_id=3,
    )


def save_tiny_model_dir(
    path: str | Path, family: str = "llama", seed: int = 0, extra_words: tuple = (), **kwargs
) -> Path:
    """Write a tiny model + tokenizer (`tiny_tokenizer(extra_words=...)`) as a Hugging Face directory;
    returns its path."""
    path = Path(path)
    tok = tiny_tokenizer(extra_words=extra_words)
    model = tiny_model(family, vocab_size=len(tok), seed=seed, **kwargs)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# Chat templates written for the tests, each behaving like one family of reasoning or tool-use
# templates (issue 32). CHATML_TEMPLATE above renders every turn as written (append-only).
# Like Qwen3's and DeepSeek-R1's: an assistant turn before the last user message loses its
# reasoning (the text up to `</think>`), and the generation prompt opens the reasoning block.
STRIP_HISTORY_TEMPLATE = (
    "{%- set ns = namespace(last=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}{%- set content = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>' + '\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n<think>' -}}{%- endif -%}"
)
# Like Qwen3's with `reasoning_content` and gpt-oss's analysis channel: reasoning is a field of the
# message, rendered before the answer.
REASONING_FIELD_TEMPLATE = (
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\n' -}}"
    "{%- if m['role'] == 'assistant' and m.reasoning_content is defined and m.reasoning_content -%}"
    "{{- '<think>' + m.reasoning_content + '</think>' -}}{%- endif -%}"
    "{{- m['content'] + '<|im_end|>' + '\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
# Like Llama 3.1's: header tokens, tool results in the `ipython` role, tools in a system block,
# calls as JSON after `<|python_tag|>`, `<|eot_id|>` ending each turn.
LLAMA3_TOOLS_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- if tools is not none -%}{{- '<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n' -}}"
    "{%- for t in tools -%}{{- t | tojson -}}{%- endfor -%}{{- '<|eot_id|>' -}}{%- endif -%}"
    "{%- for m in messages -%}{%- set role = 'ipython' if m['role'] == 'tool' else m['role'] -%}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' -}}"
    "{%- if m['role'] == 'assistant' and m.tool_calls is defined -%}{{- '<|python_tag|>' + m.tool_calls | tojson -}}"
    "{%- else -%}{{- m['content'] -}}{%- endif -%}{{- '<|eot_id|>' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)
REASONING_TEMPLATES = {
    "append_only": CHATML_TEMPLATE,
    "strips_history": STRIP_HISTORY_TEMPLATE,
    "reasoning_field": REASONING_FIELD_TEMPLATE,
    "llama3_tools": LLAMA3_TOOLS_TEMPLATE,
}
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>")


def reasoning_tokenizer(template: str = CHATML_TEMPLATE):
    """`tiny_tokenizer` with `<think>` and `</think>` as tokens of their own (added, not special:
    decoded text keeps them, as Qwen3's tokenizer does) and `template` as its chat template; the
    Llama-3-style template also gets its header tokens and `<|eot_id|>` as end of turn."""
    tok = tiny_tokenizer()
    tok.add_tokens(["<think>", "</think>"])
    if template == LLAMA3_TOOLS_TEMPLATE:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *LLAMA3_SPECIALS]})
        tok.eos_token = "<|eot_id|>"
    tok.chat_template = template
    return tok


# ---------------------------------------------------------------------------------------------
# Tiny vision-language models (issue 33): the same tokenizer with the family's image tokens, a
# one-layer vision tower on 28 x 28 (LLaVA: 4 image tokens) or 56 x 56 images (Idefics3: 16
# patches, 4 tokens after its pixel shuffle), and a template that renders image parts.

VLM_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VLM_FAMILIES = ("llava", "idefics3")
_VLM_TOKENS = {"llava": ["<image>"], "idefics3": ["<fake_token_around_image>", "<image>", "<global-img>"]}


def save_tiny_vlm_dir(
    path: str | Path, family: str = "llava", seed: int = 0, hidden: int = 32, layers: int = 2, image_size: int = 0
) -> Path:
    """Write a tiny random-init vision-language model of `family` (llava, idefics3) with its
    processor as a Hugging Face directory (AutoModelForImageTextToText and AutoProcessor load it).
    `hidden` and `layers` size the language model and the vision tower alike; `image_size` (a
    multiple of 14; default 28 for LLaVA, 56 for Idefics3) sets the tower's input, hence the tokens
    per image ((size / 14)^2 for LLaVA, a quarter of that for Idefics3)."""
    from transformers import (
        CLIPVisionConfig,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    path = Path(path)
    specials = _VLM_TOKENS[family]
    tok = tiny_tokenizer(extra_words=tuple(specials))
    tok.add_tokens(specials, special_tokens=True)  # whole tokens: the pre-tokenizer would split "<image>"
    tok.chat_template = VLM_TEMPLATE
    text = LlamaConfig(**_decoder_settings(len(tok), hidden, layers))
    vision = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=max(1, layers // 2), num_attention_heads=4
    )
    vision["patch_size"] = 14
    size = image_size or (28 if family == "llava" else 56)
    image_token = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    if family == "llava":
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(**vision, image_size=size).to_dict(),
            text_config=text.to_dict(),
            image_token_index=image_token,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        model = LlavaForConditionalGeneration(cfg)
        images = LlavaImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_pad=False
        )
        processor = LlavaProcessor(
            image_processor=images,
            tokenizer=tok,
            patch_size=14,
            num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops
            vision_feature_select_strategy="default",
            chat_template=VLM_TEMPLATE,
            image_token="<image>",
        )
    else:
        cfg = Idefics3Config(
            vision_config=Idefics3VisionConfig(**vision, image_size=size).to_dict(),
            text_config=text.to_dict(),
            image_token_id=image_token,
            scale_factor=2,
            pad_token_id=1,
        )
        model = Idefics3ForConditionalGeneration(cfg)
        images = Idefics3ImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": size}, max_image_size={"longest_edge": size}
        )
        seq = (size // 14) ** 2 // 4  # tokens per image after the 2 x 2 pixel shuffle
        processor = Idefics3Processor(
            image_processor=images, tokenizer=tok, image_seq_len=seq, chat_template=VLM_TEMPLATE
        )
    model.to(torch.float32)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
