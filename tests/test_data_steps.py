"""`alignkit data steps` (issue 31): Math-Shepherd labels on a toy task whose right steps are
known by construction, through the label logic and the command (output, resume, what `recipe: prm`
reads)."""

import json
import re

import pytest

from alignkit.datatools.steps import label_steps
from alignkit.rewards.build import build_reward
from alignkit.testing import tiny_tokenizer

PROMPT = [{"role": "user", "content": "start at 3 and add 1 three times"}]
RIGHT = ["4", "5", "6", "#### 6"]
WRONG = ["4", "7", "8", "#### 8"]  # the second step is wrong (5), and nothing after it can fix it


class Counter:
    """A completer for the toy task: from the steps written so far, it adds 1 for each step still
    to come and writes the answer; one continuation in four slips by one. So from a right prefix
    3 of 4 continuations reach the answer, from a wrong one none does."""

    def __init__(self):
        self.tokenizer = tiny_tokenizer()
        self.calls = 0

    def complete(self, texts, params, seed=0, on_result=None, progress=False):
        self.calls += 1
        out = []
        for text in texts:
            reply = text.split("<|im_start|>assistant\n", 1)[1]
            values = [int(v) for v in re.findall(r"\d+", reply)]
            final = values[-1] + (3 - len(values))
            out.append([f"#### {final + (1 if r % 4 == 3 else 0)}" for r in range(params.n)])
        return out

    def chat(self, conversations, params, seed=0, on_result=None, progress=False):
        return [["\n".join(RIGHT)] * params.n for _ in conversations]


def test_step_labels_are_the_share_of_rollouts_that_reach_the_answer():
    from alignkit.generation.decode import SamplingParams

    items = [{"prompt": PROMPT, "steps": s, "columns": {"answer": "#### 6"}} for s in (RIGHT, WRONG)]
    right, wrong = label_steps(
        Counter(),
        Counter().tokenizer,
        items,
        build_reward("numeric_match"),
        SamplingParams(),
        rollouts=4,
        separator="\n",
        seed=0,
    )
    assert right["soft"] == [0.75, 0.75, 0.75, 1.0] and right["hard"] == [1.0, 1.0, 1.0, 1.0]
    assert wrong["soft"] == [0.75, 0.0, 0.0, 0.0] and wrong["hard"] == [1.0, 0.0, 0.0, 0.0]
    assert right["solution_correct"] and not wrong["solution_correct"] and right["answer"] == "#### 6"


def test_data_steps_writes_what_recipe_prm_reads_and_resumes(tmp_path, monkeypatch, capsys):
    from alignkit.cli import main
    from alignkit.data.steps import parse_step_record
    from alignkit.datatools import commands

    monkeypatch.setattr(commands, "_lm", lambda args: Counter())
    data = tmp_path / "solutions.jsonl"
    rows = [
        {"prompt": PROMPT, "steps": RIGHT, "answer": "#### 6"},
        {"prompt": PROMPT, "completion": "\n".join(WRONG), "answer": "#### 6"},
        {"prompt": PROMPT, "answer": "#### 6"},  # no solution: one is sampled (the right one, here)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "labelled.jsonl"
    args = ["data", "steps", "--data", str(data), "--out", str(out), "--rollouts", "4", "--label", "soft"]
    assert main(args + ["--no-progress"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["labels"] for r in records] == [[0.75, 0.75, 0.75, 1.0], [0.75, 0.0, 0.0, 0.0], [0.75, 0.75, 0.75, 1.0]]
    for n, r in enumerate(records):  # each record is a valid `recipe: prm` record
        ex = parse_step_record(r, f"labelled.jsonl:{n + 1}")
        assert list(ex.labels) == r["labels"] and list(ex.steps) == r["steps"]
    assert "3 records written" in capsys.readouterr().out
    assert main(args + ["--no-progress"]) == 2  # finished: refused, nothing redone
    assert main(args + ["--no-progress", "--resume"]) == 2
    with pytest.raises(SystemExit):
        main(["data", "steps", "--data", str(data), "--out", str(tmp_path / "x.jsonl"), "--label", "medium"])
