"""The README's quickstart data: a tiny random-init model and the records to train it on, so the
quickstart runs in seconds on any CPU with nothing downloaded (tests/test_docs.py runs it as written).

    python examples/quickstart_data.py runs/quickstart

writes, under the given directory:
- `tiny-model/`: a 2-block Llama-style model with random weights and a small word-level tokenizer
  with a chat template (`alignkit.testing`, the model the unit tests train), as a transformers
  directory: `model.name_or_path=runs/quickstart/tiny-model`;
- `pairs.jsonl`: preference pairs for DPO, "what is the sum of 17 and 25 ?" with the right sum as
  `chosen` and a wrong one as `rejected`;
- `prompts.jsonl`: prompts for GRPO with an `answer` column, which the `numeric_match` reward reads.

The tiny model learns nothing worth keeping; swap in a real one (`model.name_or_path=
smollm2-135m-instruct`, the bundled default) and the same commands train it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def records(n: int, seed: int) -> list[tuple[str, int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        out.append((f"what is the sum of {a} and {b} ?", a + b, wrong))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to write tiny-model/, pairs.jsonl and prompts.jsonl into")
    parser.add_argument("--records", type=int, default=64, help="pairs and prompts to write (default 64)")
    parser.add_argument("--smoke", action="store_true", help="4 records (tests/test_bench_smoke.py)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.records = 4

    from alignkit.testing import save_tiny_model_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_tiny_model_dir(out / "tiny-model", seed=0)
    rows = records(args.records, seed=0)
    with open(out / "pairs.jsonl", "w") as f:
        for prompt, right, wrong in rows:
            pair = {"prompt": prompt, "chosen": f"the answer is {right} .", "rejected": f"the answer is {wrong} ."}
            f.write(json.dumps(pair) + "\n")
    with open(out / "prompts.jsonl", "w") as f:
        for prompt, right, _ in rows:
            f.write(json.dumps({"prompt": prompt, "answer": str(right)}) + "\n")
    print(f"wrote {out / 'tiny-model'}, {out / 'pairs.jsonl'} and {out / 'prompts.jsonl'} ({len(rows)} records each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
