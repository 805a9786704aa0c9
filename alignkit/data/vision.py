"""Images in prompts, for vision-language models: the record forms, loading, and the processor step.

A prompt message may hold a list of content parts instead of a string, as `transformers`' chat
templates take them:

    {"role": "user", "content": [{"type": "image", "image": "shapes/0.png"},
                                 {"type": "text", "text": "What colour is the square?"}]}

An image is a local file path (relative to the data file's folder, or absolute), bytes, a
`datasets` Image value (`{"bytes": ..., "path": ...}`, or the decoded PIL image), given as the
part's `image` (or `path`). Or the record has an `images` column, a list of images in the same
forms, which fill the prompt's payload-less `{"type": "image"}` parts in order; a prompt without
image parts gets them before the text of its first user message. Images go in the prompt only.

The chat template renders each image as the model's placeholder token; the model's processor
(`AutoProcessor`) then expands each placeholder to the image's tokens and computes the pixel
inputs, so an image counts toward `data.max_length` with the processor's own token count.
`VisionInputs` holds one prompt's pixel inputs; `collate_vision` stacks those of a batch in the
order their images occur in the batch's rows, which is the order the model fills its image
tokens in (row-major), whatever the layout (padded, packed, prefix-shared).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.data.readers import RecordError
from alignkit.errors import DataError, ModelError

IMAGES_FIELD = "images"
# Architectures tested with alignkit (tiny random-init models in tests/test_vision.py), and the
# axis each processor output stacks images on: Idefics3-style processors return pixel inputs
# [1, images, ...] for one prompt (the model flattens batch and image axes before filling the
# image tokens in row-major order), LLaVA's [images, ...].
STACK_AXIS = {"llava": 0, "idefics3": 1, "smolvlm": 1}
# Multimodal rotary positions (M-RoPE) give an image's tokens 2D positions that a packed or
# prefix-shared layout, with its 1D positions, cannot express.
MROPE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v")


def is_vision_config(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def check_architecture(model_type: str, name: str) -> None:
    if model_type in MROPE:
        raise ModelError(
            f"{name} is a {model_type} model, whose multimodal rotary positions (M-RoPE) alignkit's packed "
            f"and prefix-shared layouts cannot express yet; tested vision-language architectures: "
            f"{', '.join(STACK_AXIS)}."
        )
    if model_type not in STACK_AXIS:
        raise ModelError(
            f"{name} is a {model_type} vision-language model, which alignkit has not been tested with; tested "
            f"architectures: {', '.join(STACK_AXIS)} (docs/vision.md says how to add one)."
        )


# ---------------------------------------------------------------------------------------------
# Records


def check_parts(content, where: str, location: str) -> list:
    """A message's list of content parts, validated: `{"type": "text", "text": str}` or
    `{"type": "image"[, "image" | "path": an image]}`."""
    parts = []
    for j, part in enumerate(content):
        here = f"part {j} of {where}"
        if not isinstance(part, Mapping) or part.get("type") not in ("text", "image"):
            raise RecordError(
                location,
                f"{here} must be {{type: text, text: ...}} or {{type: image, image: ...}}; found {_short(part)}",
            )
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise RecordError(location, f"{here} is a text part without a string `text`")
        part = {k: v for k, v in part.items() if v is not None}
        if part["type"] == "image" and _payload(part) is not None:
            part = {"type": "image", "image": resolve_path(_payload(part), location)}
        parts.append(part)
    return parts


def resolve_path(ref, location: str):
    """A relative image path read from the data file's folder (`location`: `path:line`); other
    references as they are. Done when the record is read, so a prompt carries usable paths anywhere."""
    if (
        isinstance(ref, str)
        and not ref.startswith(("http://", "https://"))
        and not Path(ref).expanduser().is_absolute()
    ):
        return str(Path(location.rpartition(":")[0]).parent / ref)
    return ref


def text_of(content) -> str:
    """A message's text: the string, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")


def _payload(part: dict):
    return part.get("image", part.get("path"))


def attach_images(prompt: list, images, location: str, label: str) -> list:
    """The prompt with the record's `images` column placed: into its payload-less image parts, in
    order, or (when it has none) before the first user message's text."""
    if not isinstance(images, (list, tuple)):
        raise RecordError(location, f"{label} must be a list of images (paths, bytes or image objects)")
    empty = [
        (i, j)
        for i, m in enumerate(prompt)
        if not isinstance(m["content"], str)
        for j, p in enumerate(m["content"])
        if p["type"] == "image" and _payload(p) is None
    ]
    given = sum(
        1
        for m in prompt
        if not isinstance(m["content"], str)
        for p in m["content"]
        if p["type"] == "image" and _payload(p) is not None
    )
    if given and images:
        raise RecordError(
            location,
            f"{label} holds images and the prompt's image parts hold {given} already; give each image once, "
            "in its part or in the column (with payload-less {type: image} parts where they go)",
        )
    prompt = [dict(m) for m in prompt]
    if not empty:
        first = next((i for i, m in enumerate(prompt) if m["role"] == "user"), None)
        if first is None:
            raise RecordError(location, f"{label} is given but the prompt has no user message to hold the images")
        content = prompt[first]["content"]
        text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        prompt[first]["content"] = [{"type": "image", "image": resolve_path(im, location)} for im in images] + text
        return prompt
    if len(empty) != len(images):
        raise RecordError(
            location,
            f"{label} holds {len(images)} images but the prompt has {len(empty)} image parts without one; "
            "give one image per {type: image} part",
        )
    for (i, j), image in zip(empty, images):
        content = list(prompt[i]["content"])
        content[j] = {"type": "image", "image": resolve_path(image, location)}
        prompt[i]["content"] = content
    return prompt


def prompt_images(messages) -> list:
    """The image payloads of a prompt, in order (a payload-less part is an error)."""
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            continue
        for p in m["content"]:
            if p["type"] == "image":
                out.append(_payload(p))
    return out


def load_image(ref, source: str, index: int):
    """One image as an RGB PIL image. Paths are read relative to the data file's folder (from
    `source`, `path:line`) unless absolute; errors name the record and the image."""
    from PIL import Image, UnidentifiedImageError

    what = f"image {index} of the prompt"
    if ref is None:
        raise RecordError(source, f"{what} has no image: give it as the part's `image` or in the `images` column")
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, Mapping):  # a `datasets` Image value as stored
        ref = ref.get("bytes") or ref.get("path")
    try:
        if isinstance(ref, (bytes, bytearray)):
            image = Image.open(io.BytesIO(ref))
        elif isinstance(ref, str):
            if ref.startswith(("http://", "https://")):
                raise RecordError(source, f"{what} is a URL ({ref}); download it and give the local path")
            path = Path(resolve_path(ref, source)).expanduser()
            if not path.is_file():
                raise RecordError(
                    source, f"{what}: file {path} not found (relative paths start at the data file's folder)"
                )
            image = Image.open(path)
        else:
            raise RecordError(source, f"{what} is {_short(ref)}; give a path, bytes or an image")
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise RecordError(source, f"{what} cannot be read as an image: {e}") from None
    return image.convert("RGB")


def thumbnail_uri(ref, source: str, size: int = 96) -> str:
    """A small PNG of the image as a data URI, for a report that stands alone (no files beside it)."""
    import base64

    image = load_image(ref, source, 0)
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------
# The processor step and batches


@dataclass
class VisionInputs:
    """One prompt's pixel inputs as the processor returned them, and the axis their images stack on;
    for a sampler that lays out images itself (vLLM), the prompt before the processor expanded its
    images and the images as the record gave them (not checkpointed: a resumed run re-reads them)."""

    tensors: dict  # name -> tensor (pixel_values, pixel_attention_mask, image_sizes, ...)
    axis: int
    num_images: int
    placeholder_ids: list | None = None  # one placeholder token per image, as the chat template renders it
    images: tuple = ()  # each image's reference (path, bytes, datasets value, PIL image)
    source: str = ""  # the record, for errors when an image is read again

    def checkpointed(self) -> dict:
        """What a checkpoint keeps (tensors and ints: `torch.load(weights_only=True)` reads it back)."""
        return {"tensors": self.tensors, "axis": self.axis, "num_images": self.num_images}

    def load_images(self) -> list:
        return [load_image(ref, self.source, i) for i, ref in enumerate(self.images)]


class VisionProcessor:
    """The model's processor, for the one step text tokenizers cannot do: expanding each image
    placeholder of a rendered prompt to the image's tokens, and computing its pixel inputs."""

    def __init__(self, processor, model_type: str):
        self.processor = processor
        self.model_type = model_type
        self.axis = STACK_AXIS[model_type]
        # the tokens only the processor places (an image's tokens and their wrappers): a sampler
        # never draws them, since a reply holding one could not be laid out against any pixels
        tok = processor.tokenizer
        names = [getattr(processor, n, None) for n in ("image_token", "fake_image_token", "global_image_tag")]
        ids = {tok.convert_tokens_to_ids(str(t)) for t in names if t}
        self.layout_ids = tuple(sorted(i for i in ids if i is not None and i != tok.unk_token_id))

    def encode_prompt(self, text: str, messages, source: str) -> tuple[list, VisionInputs | None]:
        """(token ids, pixel inputs) of `messages` rendered as `text` (special tokens are in the text)."""
        refs = tuple(prompt_images(messages))
        loaded = [load_image(ref, source, i) for i, ref in enumerate(refs)]
        try:
            out = self.processor(
                text=[text], images=[loaded] if loaded else None, return_tensors="pt", add_special_tokens=False
            )
        except ValueError as e:  # e.g. the template rendered fewer placeholders than there are images
            raise DataError(f"{source}: the processor cannot lay out the prompt's {len(loaded)} images: {e}") from None
        ids = out["input_ids"][0].tolist()
        tensors = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
        if not loaded:
            return ids, None
        placeholders = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, VisionInputs(tensors, self.axis, len(loaded), placeholders, refs, source)

    def save_pretrained(self, path) -> None:
        self.processor.save_pretrained(path)


class PixelPrompt(list):
    """A prompt's token ids that carry its pixel inputs, for a sampler: the prefill forward takes
    the pixels of its prompts' images (`collate_vision` over the batch's prompts, in row order)."""

    def __init__(self, ids, vision: VisionInputs | None):
        super().__init__(ids)
        self.vision = vision


def prompt_pixels(prompts: list) -> dict:
    """The model inputs for the images of a batch of prompts (token-id lists, some `PixelPrompt`s)."""
    return collate_vision([getattr(p, "vision", None) for p in prompts]) or {}


def refuse_pixels(prompts: list, sampler: str) -> None:
    """A sampler that takes token ids only must not drop a prompt's images silently."""
    if any(getattr(p, "vision", None) is not None for p in prompts):
        from alignkit.errors import ConfigError

        raise ConfigError(
            f"the prompts hold images, which {sampler} does not take yet (token ids only); sample them with "
            "alignkit's own sampler (--backend transformers / generation.backend: transformers)."
        )


def vision_of(tokenizer) -> VisionProcessor | None:
    """The processor a vision-language model's tokenizer was loaded with (`models.load_tokenizer`)."""
    return getattr(tokenizer, "alignkit_vision", None)


def has_images(messages) -> bool:
    if isinstance(messages, str):
        return False
    return any(not isinstance(m["content"], str) and any(p["type"] == "image" for p in m["content"]) for m in messages)


def require_vision(tokenizer, messages, source: str) -> VisionProcessor | None:
    """The processor when the prompt holds images (an error for a text-only model), else None."""
    if not has_images(messages):
        return None
    vision = vision_of(tokenizer)
    if vision is None:
        raise DataError(
            f"{source}: the prompt holds images but the model is text-only; use a vision-language model "
            "(one that loads with AutoModelForImageTextToText and AutoProcessor)"
        )
    return vision


def collate_vision(inputs: list) -> dict | None:
    """The pixel inputs of a batch's prompts in row order (None entries: prompts without images)."""
    present = [v for v in inputs if v is not None]
    if not present:
        return None
    axis = present[0].axis
    return {k: torch.cat([v.tensors[k] for v in present], dim=axis) for k in present[0].tensors}
