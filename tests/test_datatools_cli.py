"""The data commands end to end on tiny models (issue 19): Magpie synthesis resumes an interrupted
run without redoing finished work, pairs come from an OpenAI-compatible endpoint (and survive the
endpoint going down), and one `iterate` round writes pairs, trains on them and reports."""

import json

import pytest
import torch
from conftest import write_jsonl
from openai_server import OpenAIServer

from alignkit.cli import main
from alignkit.data.formats import load_preference_examples
from alignkit.datatools import synth
from alignkit.generation.text_models import LocalModel
from alignkit.testing import tiny_model, tiny_tokenizer

PROMPTS = [{"prompt": f"what is {i} yes no ?"} for i in range(20)]
CHARS = "def chars(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n"


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_magpie_synthesis_resumes_an_interrupted_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "magpie.jsonl"
    args = [
        "data",
        "synth",
        "--method",
        "magpie",
        "--model",
        str(tiny_model_dir),
        "--n",
        "40",
        "--out",
        str(out),
        "--max-new-tokens",
        "8",
        "--min-words",
        "1",
        "--no-progress",
    ]
    real, calls = synth.magpie, []

    def flaky(lm, tok, n, params, seed=0, **kw):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is stopped during its second chunk
        return real(lm, tok, n, params, seed, **kw)

    monkeypatch.setattr(synth, "magpie", flaky)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not out.exists() and len(_lines(tmp_path / "magpie.jsonl.partial.jsonl")) == 1  # chunk 1 kept
    assert main(args) != 0 and "add --resume to finish it" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert calls[2:] == [16, 32]  # chunks 2 and 3 only (seed 0 * 1_000_003 + start); chunk 1 was not redone
    records = _lines(out)
    summary = (tmp_path / "magpie.jsonl.summary.md").read_text()
    sampled = int(summary.split("| synth: sampled | ")[1].split(" |")[0])
    kept = int(summary.split("| filter: kept | ")[1].split(" |")[0])
    assert sampled == 40 and kept == len(records) and all(set(r) == {"prompt", "completion"} for r in records)
    assert not (tmp_path / "magpie.jsonl.partial.jsonl").exists()


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    return LocalModel(tiny_model(vocab_size=len(tok), hidden=32).eval(), tok, batch_size=8)


def test_pairs_from_an_endpoint_that_goes_down_then_resume(served, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    (tmp_path / "chars.py").write_text(CHARS)
    out = tmp_path / "pairs.jsonl"
    with OpenAIServer(
        served, down_after=16
    ) as server:  # answers the first chunk (16 requests of 3 replies), then fails
        args = [
            "data",
            "pairs",
            "--endpoint",
            server.url,
            "--model",
            "tiny",
            "--prompts",
            str(prompts),
            "--k",
            "3",
            "--reward",
            f"{tmp_path / 'chars.py'}:chars",
            "--min-margin",
            "1",
            "--out",
            str(out),
            "--max-new-tokens",
            "6",
            "--retries",
            "0",
            "--concurrency",
            "1",
            "--no-progress",
        ]
        assert main(args) != 0
        assert f"endpoint {server.url} (model tiny) failed after 1 attempt" in capsys.readouterr().err
    assert len(_lines(tmp_path / "pairs.jsonl.partial.jsonl")) == 16  # the finished prompts are kept
    with OpenAIServer(served) as server:
        args[args.index("--endpoint") + 1] = server.url
        assert main(args + ["--resume"]) == 0
        assert server.requests == 4  # only the 4 prompts left
    pairs = load_preference_examples(str(out)).examples
    records = _lines(out)
    assert len(pairs) == len(records) > 0 and all(r["margin"] >= 1 for r in records)
    assert all(len(r["chosen"]) - len(r["rejected"]) == r["margin"] for r in records)  # the reward: characters


def test_one_iterate_round(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:8])
    held = write_jsonl(tmp_path / "h.jsonl", PROMPTS[8:12])
    (tmp_path / "chars.py").write_text(CHARS)
    out = tmp_path / "it"
    args = [
        "iterate",
        "recipe=dpo",
        f"model.name_or_path={tiny_model_dir}",
        "train.max_steps=2",
        "train.batch_size=4",
        "data.eval_fraction=0",
        "train.report_to=[]",
        f"cache_dir={tmp_path / 'cache'}",
        "--prompts",
        str(prompts),
        "--heldout",
        str(held),
        "--reward",
        f"{tmp_path / 'chars.py'}:chars",
        "--k",
        "3",
        "--min-margin",
        "1",
        "--max-new-tokens",
        "6",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    state = json.loads((out / "iterate.json").read_text())
    (row,) = state["rounds"]
    assert row["pairs"] == len(_lines(out / "round-1" / "pairs.jsonl")) > 0
    assert (out / "round-1" / "run" / "final" / "config.json").exists()
    assert len(row["heldout_before"]) == len(row["heldout_after"]) == 4
    assert row["after"] == pytest.approx(sum(row["heldout_after"]) / 4)
    assert "| 1 |" in (out / "iterate.md").read_text()
    assert main(args) == 0  # the finished round is not redone
    assert json.loads((out / "iterate.json").read_text())["rounds"] == state["rounds"]


def test_judge_rewrite_select_and_principles_commands(tiny_model_dir, tmp_path):
    from alignkit.datatools.principles import dedupe, propose
    from alignkit.datatools.select import complexity_score
    from alignkit.generation.decode import SamplingParams
    from alignkit.generation.text_models import text_model
    from alignkit.inference.rewrite import rewrite

    m = ["--model", str(tiny_model_dir), "--max-new-tokens", "6", "--no-progress"]
    # The same model, called through the library rather than the CLI: what each command must reproduce.
    lm = text_model(model=str(tiny_model_dir), batch_size=16)
    principles = tmp_path / "principles.yaml"
    principles.write_text("principles:\n  - Answer the question that was asked.\n  - Be brief.\n")
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": f"what is {i} ?", "chosen": "yes it is one", "rejected": "no no no no"} for i in range(10)],
    )
    assert (
        main(
            [
                "data",
                "judge",
                "--data",
                str(pairs),
                "--principles",
                str(principles),
                "--out",
                str(tmp_path / "judged.jsonl"),
                *m,
            ]
        )
        == 0
    )
    judged = _lines(tmp_path / "judged.jsonl")
    assert len(judged) == 10 and all(isinstance(r["judge_margin"], float) for r in judged)
    # The tiny word-level vocabulary has no "A" or "B": both options encode as <unk> (id 0), so the
    # judge's log p("A") - log p("B") is exactly 0 in both orders and every margin is exactly 0.0;
    # a tie counts as not agreeing with chosen.
    assert (
        lm.tokenizer("A", add_special_tokens=False)["input_ids"]
        == lm.tokenizer("B", add_special_tokens=False)["input_ids"]
        == [lm.tokenizer.unk_token_id]
    )
    assert [r["judge_margin"] for r in judged] == [0.0] * 10
    assert [r["prompt"] for r in judged] == [[{"role": "user", "content": f"what is {i} ?"}] for i in range(10)]
    summary = (tmp_path / "judged.jsonl.summary.md").read_text()
    assert "| mean judge_margin | 0.0 |" in summary and "| judge agrees with chosen (margin > 0) | 0/10 |" in summary

    sft = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": f"what is {i} yes ?", "completion": "one " * (i + 1)} for i in range(8)]
    )
    assert main(["data", "rewrite", "--data", str(sft), "--out", str(tmp_path / "rw.jsonl"), *m]) == 0
    rewritten = _lines(tmp_path / "rw.jsonl")
    assert [r["original_prompt"] for r in rewritten] == [f"what is {i} yes ?" for i in range(8)]
    assert all(isinstance(r["prompt"], str) and r["prompt"] for r in rewritten)
    # Greedy (data rewrite's default temperature 0), so the CLI's text is the library's; 6 new tokens
    # of a word-level vocabulary are 6 words. The random model writes the same six words whatever
    # the digit in the instruction: the long template dominates its context.
    direct = rewrite(lm, [f"what is {i} yes ?" for i in range(8)], SamplingParams(max_new_tokens=6, temperature=0.0))
    assert direct.fallbacks == [] and [r["prompt"] for r in rewritten] == list(direct)
    assert [r["prompt"] for r in rewritten] == ["5 this red you but how"] * 8
    assert [r["completion"] for r in rewritten] == ["one " * (i + 1) for i in range(8)]  # other columns kept
    assert "| kept as they were | 0 |" in (tmp_path / "rw.jsonl.summary.md").read_text()

    assert (
        main(
            [
                "data",
                "select",
                "--data",
                str(sft),
                "--budget",
                "3",
                "--min-distance",
                "0.0001",
                "--out",
                str(tmp_path / "sel.jsonl"),
                *m,
            ]
        )
        == 0
    )
    chosen = _lines(tmp_path / "sel.jsonl")
    assert len(chosen) == 3 and "<svg" in (tmp_path / "sel.jsonl.scores.svg").read_text()
    scores = [r["select_score"] for r in chosen]
    assert scores == sorted(scores, reverse=True)  # score first
    # Without --reward the score is the complexity alone. A random model rates the six digits about
    # equally, so every expected rating is near the uniform mean 3.5; the three highest are prompts
    # 2, 3 and 6, and no two texts are within cosine distance 1e-4, so none is skipped as redundant.
    comp = complexity_score(lm, [f"what is {i} yes ?" for i in range(8)])
    top = sorted(range(8), key=lambda i: -comp[i])[:3]
    assert top == [2, 3, 6]
    assert chosen == [
        {"prompt": f"what is {i} yes ?", "completion": "one " * (i + 1), "select_score": comp[i]} for i in top
    ]
    # float32 logits: pinned to 1e-5, below the gaps between these scores (8e-5 and more)
    assert scores == pytest.approx([3.485807, 3.485546, 3.485463], abs=1e-5)
    summary = (tmp_path / "sel.jsonl.summary.md").read_text()
    for row in ("| records | 8 |", "| selected | 3 |", "| redundant | 0 |", "| not_reached | 5 |"):
        assert row in summary
    svg = (tmp_path / "sel.jsonl.scores.svg").read_text()
    assert f"<!-- all (n=8, mean {sum(comp) / 8:.3g}) -->" in svg  # the legend: 3.49
    assert f"<!-- selected (n=3, mean {sum(scores) / 3:.3g}) -->" in svg

    assert (
        main(
            [
                "data",
                "principles",
                "--pairs",
                str(pairs),
                "--heldout-fraction",
                "0.3",
                "--max-principles",
                "2",
                "--out",
                str(tmp_path / "pr.jsonl"),
                *m,
            ]
        )
        == 0
    )
    found = _lines(tmp_path / "pr.jsonl")
    assert len(found) <= 2 and all(0.0 <= r["heldout_agreement"] <= 1.0 for r in found)
    assert "majority vote" in (tmp_path / "pr.jsonl.summary.md").read_text()
    # 10 pairs at 0.3 held out: the first 7 propose, the last 3 check. Every judge margin is 0 (see
    # above), so every agreement is 0 and the ranking keeps proposal order: the first two distinct
    # principles proposed from the first 7 pairs (sampled at the command's temperature 0.7, seed 0).
    train = [
        {
            "prompt": [{"role": "user", "content": f"what is {i} ?"}],
            "chosen": "yes it is one",
            "rejected": "no no no no",
        }
        for i in range(7)
    ]
    proposed = propose(lm, train, SamplingParams(max_new_tokens=6, temperature=0.7), seed=0)
    assert [r["principle"] for r in found] == dedupe(proposed)[:2]
    assert [(r["train_agreement"], r["heldout_agreement"]) for r in found] == [(0.0, 0.0), (0.0, 0.0)]
    summary = (tmp_path / "pr.jsonl.summary.md").read_text()
    for row in (
        "| train pairs | 7 |",
        "| held-out pairs | 3 |",
        f"| principles proposed | {len(proposed)} |",
        f"| after deduplication | {len(dedupe(proposed))} |",
        "| kept | 2 |",
        "| held-out agreement of the kept principles' majority vote | 0.0 |",
    ):
        assert row in summary


def test_generate_with_the_rewrite_strategy(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:3])
    (tmp_path / "chars.py").write_text(CHARS)
    out = tmp_path / "gen.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--prompts",
                str(prompts),
                "--reward",
                f"{tmp_path / 'chars.py'}:chars",
                "--strategy",
                "rewrite",
                "--max-new-tokens",
                "5",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rows = _lines(out)
    assert len(rows) == 3 and all(r["reward"] == float(len(r["completion"])) for r in rows)  # judged as answered


def test_self_align_records_leave_the_principles_out(tiny_model_dir, tmp_path):
    principles = tmp_path / "p.yaml"
    principles.write_text(
        'principles:\n  - Be kind and say yes.\nexemplars:\n  - {prompt: "what is one ?", completion: "yes one"}\n'
    )
    prompts = write_jsonl(tmp_path / "q.jsonl", PROMPTS[:5])
    out = tmp_path / "sa.jsonl"
    assert (
        main(
            [
                "data",
                "synth",
                "--method",
                "self-align",
                "--principles",
                str(principles),
                "--prompts",
                str(prompts),
                "--model",
                str(tiny_model_dir),
                "--max-new-tokens",
                "6",
                "--min-words",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    records = _lines(out)
    summary = (tmp_path / "sa.jsonl.summary.md").read_text()
    assert int(summary.split("| synth: prompts | ")[1].split(" |")[0]) == 5
    assert all(set(r) == {"prompt", "completion"} and "kind" not in r["prompt"] for r in records)
    assert {r["prompt"] for r in records} <= {p["prompt"] for p in PROMPTS[:5]}
    assert "<svg" in (tmp_path / "sa.jsonl.lengths.svg").read_text()
