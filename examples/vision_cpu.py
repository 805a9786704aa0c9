"""A vision-language model aligned on a task whose answer is only in the image, on a 2-core CPU:
SFT from scratch, then GRPO with the images in its prompts.

    python examples/vision_cpu.py [--sft-steps 60] [--grpo-steps 60] [--heldout 240] [--family llava]

The task: an image drawn with Pillow holds one to three filled shapes (squares or discs) of one
colour (red, green or blue) at random places and sizes on a grey ground; the question asks for the
colour ("which is it ?") or the count ("what number ?": the tiny vocabulary's words); the reply is one word ("red",
"2"). Training images and held-out images come from different seeds, so held-out accuracy
measures what the model reads from pixels it has not seen.

No pretrained vision-language model can be installed here (none on PyPI; the hub is out of
reach), so the model is a small one trained from scratch (`alignkit.testing`'s tokenizer, a
2-layer vision tower on 56 x 56 images, a 4-layer language model of width 96; LLaVA-style with
16 image tokens, or with `--family idefics3` Idefics3-style (SmolVLM's) with 4;
`model.train_vision: true`, since a random tower has nothing to keep frozen). SFT on the right
answers runs first (`--sft-steps`, stopped well before it saturates, so that there is room to
improve), then GRPO (`--grpo-steps`, 8 samples of up to 3 tokens per
prompt, temperature 1) with a reward of 1 for a reply whose first word is the answer, sampling
with alignkit's own sampler, which reads each prompt's image at the prefill. Held-out accuracy
(greedy, first word) before GRPO (= after SFT) and after, with a paired 95% bootstrap interval of
the change. Last line: `heldout_accuracy before=<x> after=<y> n=<n>`. `--smoke`
(examples/smoke.py): the same code in seconds, with fewer images and steps.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import smoke

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220)}
COUNTS = {1: "1", 2: "2", 3: "3"}
QUESTIONS = {"colour": "which is it ?", "count": "what number ?"}  # words of the tiny tokenizer's vocabulary

REWARD = '''
def first_word(prompts, completions, answer, **columns):
    """1 when the reply's first word is the answer, else 0."""
    return [float(c.split()[:1] == [a]) for c, a in zip(completions, answer)]
'''


def draw(rng: random.Random, path: Path) -> dict:
    """One image: 1-3 shapes of one colour, none overlapping; returns its colour and count."""
    from PIL import Image, ImageDraw

    colour, count = rng.choice(list(COLOURS)), rng.choice(list(COUNTS))
    image = Image.new("RGB", (56, 56), (128, 128, 128))
    pen = ImageDraw.Draw(image)
    boxes: list = []
    while len(boxes) < count:
        size = rng.randint(9, 15)
        x, y = rng.randint(1, 55 - size), rng.randint(1, 55 - size)
        box = (x, y, x + size, y + size)
        if any(not (box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1]) for b in boxes):
            continue
        boxes.append(box)
        (pen.rectangle if rng.random() < 0.5 else pen.ellipse)(box, fill=COLOURS[colour])
    image.save(path)
    return {"colour": colour, "count": COUNTS[count]}


def make_split(out: Path, name: str, n: int, seed: int) -> list:
    """`n` records {prompt (the image and a question), answer, kind}: both questions of each image."""
    rng = random.Random(seed)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range((n + 1) // 2):
        facts = draw(rng, folder / f"{i}.png")
        for kind, question in QUESTIONS.items():
            content = [{"type": "image", "image": f"{name}/{i}.png"}, {"type": "text", "text": question}]
            rows.append({"prompt": [{"role": "user", "content": content}], "answer": facts[kind], "kind": kind})
    return rows[:n]


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def heldout_accuracy(model_dir: str, held: Path) -> list:
    """Per held-out prompt: 1.0 when the greedy reply's first word is the answer."""
    from alignkit.config import ModelConfig
    from alignkit.data.prompts import load_prompt_examples
    from alignkit.generation.decode import SamplingParams
    from alignkit.generation.hf import generate
    from alignkit.models import load_model, load_tokenizer

    mc = ModelConfig(name_or_path=model_dir)
    tokenizer, model = load_tokenizer(mc), load_model(mc, for_training=False)
    examples = load_prompt_examples(str(held)).examples
    replies = generate(model, tokenizer, [list(e.prompt) for e in examples], SamplingParams(max_new_tokens=3))
    return [float(r[0].split()[:1] == [e.columns["answer"]]) for r, e in zip(replies, examples)]


def run(recipe: str, model: str, data: Path, out: Path, steps: int, lr: float, extra: list):
    from alignkit.config import load_config
    from alignkit.train.loop import train

    cfg = load_config(
        None,
        [
            f"recipe={recipe}",
            f"model.name_or_path={model}",
            "model.train_vision=true",
            f"data.train={data}",
            "data.eval_fraction=0",
            "data.max_length=64",
            "train.batch_size=16",
            f"train.max_steps={steps}",
            f"train.learning_rate={lr}",
            "train.warmup_ratio=0",
            "train.lr_schedule=constant",
            "train.log_every=5",
            "train.report_to=[]",
            f"output_dir={out}",
            *extra,
        ],
    )
    return train(cfg, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=960, help="training prompts (two questions per image)")
    ap.add_argument("--heldout", type=int, default=240, help="held-out prompts, on images of another seed")
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--grpo-steps", type=int, default=60)
    ap.add_argument("--family", choices=["llava", "idefics3"], default="llava", help="the architecture built")
    ap.add_argument("--out", default="runs/example_vision_cpu")
    args = smoke.parse_args(ap, train=16, heldout=8, sft_steps=2, grpo_steps=1)

    from alignkit.eval.stats import paired_bootstrap
    from alignkit.testing import save_tiny_vlm_dir

    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_rows = make_split(out, "train", args.train, seed=0)
    held = write(out / "heldout.jsonl", make_split(out, "heldout", args.heldout, seed=1))
    sft_data = write(out / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["answer"]} for r in train_rows])
    grpo_data = write(out / "grpo.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in train_rows])
    (out / "reward.py").write_text(REWARD)
    base = str(save_tiny_vlm_dir(out / "base_model", args.family, seed=0, hidden=96, layers=4, image_size=56))
    print(
        f"{len(train_rows)} training prompts, {args.heldout} held out; a {args.family} model from scratch", flush=True
    )
    sft = run("sft", base, sft_data, out / "sft", args.sft_steps, 3e-3, [])
    before = heldout_accuracy(str(sft.final_dir), held)
    print(f"after {args.sft_steps} SFT steps: held-out accuracy {sum(before) / len(before):.3f}", flush=True)
    grpo_extra = [
        f"online.rewards={out / 'reward.py'}:first_word",
        "generation.num_samples=8",
        "generation.max_new_tokens=3",
        "generation.temperature=1.0",
        "online.kl_coef=0",
    ]
    grpo = run("grpo", str(sft.final_dir), grpo_data, out / "grpo", args.grpo_steps, 1e-3, grpo_extra)
    after = heldout_accuracy(str(grpo.final_dir), held)
    d = paired_bootstrap(before, after)
    minutes = (time.perf_counter() - start) / 60
    kinds = [json.loads(line)["kind"] for line in held.read_text().splitlines()]
    for kind in QUESTIONS:
        b = [x for x, k in zip(before, kinds) if k == kind]
        a = [x for x, k in zip(after, kinds) if k == kind]
        print(f"held-out {kind}: {sum(b) / len(b):.3f} -> {sum(a) / len(a):.3f} (n={len(b)})")
    print(f"held-out accuracy {d.before:.3f} -> {d.after:.3f}, change {d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]")
    print(f"total {minutes:.1f} min")
    print(f"heldout_accuracy before={d.before:.3f} after={d.after:.3f} n={len(before)}")


if __name__ == "__main__":
    sys.exit(main())
