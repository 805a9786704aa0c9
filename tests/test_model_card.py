"""final/README.md: the model card of a trained run (Hugging Face metadata header + body)."""

import json
import re
import shlex

import pytest
import yaml
from conftest import base_overrides
from huggingface_hub import ModelCard

from alignkit import cli
from alignkit.config import load_config
from alignkit.train import loop
from alignkit.train.model_card import model_card


def _split(text: str):
    """(metadata, body), parsed here independently of alignkit's reader."""
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def _row(body: str, key: str) -> str:
    m = re.search(rf"^\| {re.escape(key)} \| (.*) \|$", body, re.M)
    assert m, f"no row {key!r} in the card"
    return m.group(1)


@pytest.fixture
def lora_run(tiny_model_dir, pairs_file, tmp_path):
    cfg = load_config(
        None,
        base_overrides(tiny_model_dir, pairs_file, tmp_path / "run", tmp_path / "cache")
        + [
            "train.learning_rate=5e-3",
            "train.batch_size=4",
            "train.grad_accum=2",
            "train.warmup_ratio=0",
            "data.eval_fraction=0.1",
            "train.max_steps=3",
            "loss.name=ipo",
            "loss.beta=0.5",
            "lora.enabled=true",
            "lora.r=4",
        ],
    )
    return loop.train(cfg, progress=False).run_dir


def test_card_of_a_tiny_run(lora_run, tiny_model_dir, pairs_file):
    run_dir = lora_run
    text = (run_dir / "final" / "README.md").read_text()
    meta, body = _split(text)
    # A local model and a local file are not Hub ids: the header leaves them out, the body names them.
    assert meta == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["alignkit", "dpo", "ipo", "lora"],
    }
    assert f"`{tiny_model_dir}`" in _row(body, "base model") and f"`{pairs_file}` (local)" in _row(
        body, "training data"
    )
    assert _row(body, "recipe").startswith("`dpo`: the DPO family")
    assert _row(body, "loss").startswith("`ipo` (beta=0.5): Identity Preference Optimization") and "2310.12036" in body
    assert _row(body, "LoRA").startswith("r=4, alpha=32, dropout=0.0, target_modules=all-linear")
    assert _row(body, "examples per step") == "8 (batch_size 4 x grad_accum 2)"
    heldout = json.loads((run_dir / "heldout.json").read_text())
    assert (heldout["num_train"], len(heldout["sources"])) == (36, 4)
    assert _row(body, "training examples") == "36" and _row(body, "held-out examples") == "4"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert _row(body, "steps") == str(summary["steps"]) == "3"
    assert summary["eval"] and summary["train"]
    for split in ("eval", "train"):
        for key, value in summary[split].items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            assert f"| `{key}` | {shown} |" in body, (split, key)
    evaluation = body.split("Last evaluation on the held-out examples:")[1].split("Last logged training step:")[0]
    assert f"| `loss` | {summary['eval']['loss']:.4g} |" in evaluation
    assert "`train.grad_accum=2`" in body and "`lora.enabled=True`" in body  # settings off their defaults

    card = ModelCard.load(run_dir / "final" / "README.md")
    assert card.data.library_name == "transformers" and card.data.tags == ["alignkit", "dpo", "ipo", "lora"]
    assert card.data.base_model is None


def test_the_cards_command_trains_the_run_again(lora_run):
    body = (lora_run / "final" / "README.md").read_text()
    (command,) = re.findall(r"```bash\n(.*)\n```", body)
    argv = shlex.split(command)
    assert argv[:4] == ["alignkit", "train", "--config", f"{lora_run}/config.yaml"]
    assert cli.main(argv[1:]) == 0
    again, first = (json.loads((d / "summary.json").read_text()) for d in (lora_run.parent / "run-again", lora_run))

    def run_metrics(metrics):  # without the wall-clock ones, which are not a property of the run
        return {k: v for k, v in metrics.items() if k not in ("tokens_per_s", "step_time_s") and "time/" not in k}

    for split in ("train", "eval"):
        assert run_metrics(again[split]) == run_metrics(first[split]) and "loss" in run_metrics(first[split])


def test_hub_ids_go_in_the_header(tmp_path):
    cfg = load_config(
        None,
        [
            "model.name_or_path=HuggingFaceTB/SmolLM2-360M-Instruct",
            "data.train=trl-lib/hh-rlhf",
            "data.eval=trl-lib/hh-rlhf-test",
            "recipe=sft",
        ],
    )
    text = model_card(cfg, tmp_path / "run", 10, {"loss": 1.5}, {"loss": 1.25})
    meta, body = _split(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert meta["datasets"] == ["trl-lib/hh-rlhf", "trl-lib/hh-rlhf-test"]
    assert meta["tags"] == ["alignkit", "sft"] and "license" not in meta  # its card is not in the hub cache here
    assert "[trl-lib/hh-rlhf](https://huggingface.co/datasets/trl-lib/hh-rlhf) (Hub)" in body
    card = ModelCard(text)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-360M-Instruct" and card.data.datasets == meta["datasets"]


def test_bundled_and_cached_models_name_their_hub_id_and_license(tmp_path):
    meta, body = _split(model_card(load_config(None, ["data.train=pairs.jsonl"]), tmp_path, 1, {}, {}))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert "bundled Q4_1 GGUF" in body and "No held-out evaluation was logged." in body
    # A local directory that is a snapshot in the Hugging Face cache: its repo id and its card's license.
    snapshot = tmp_path / "hub" / "models--acme--tiny-chat" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: mit\ntags: [chat]\n---\n# tiny\n")
    meta, _ = _split(
        model_card(load_config(None, [f"model.name_or_path={snapshot}", "data.train=x.jsonl"]), tmp_path, 1, {}, {})
    )
    assert meta["base_model"] == "acme/tiny-chat" and meta["license"] == "mit"
