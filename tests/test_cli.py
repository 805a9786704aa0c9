from conftest import base_overrides, write_jsonl

from alignkit.cli import main


def test_train_command_runs_and_writes_run_dir(tiny_model_dir, pairs_file, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("recipe: dpo\nloss: {name: ipo, beta: 0.5}\ntrain:\n  max_steps: 2\n  batch_size: 4\n")
    rc = main(
        ["train", "--config", str(cfg), *base_overrides(tiny_model_dir, pairs_file, tmp_path / "run", tmp_path / "c")]
    )
    assert rc == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: ipo" in saved and "beta: 0.5" in saved
    assert "eval:" in capsys.readouterr().out


def test_user_errors_exit_2_with_message(tiny_model_dir, pairs_file, tmp_path, capsys):
    rc = main(["train", *base_overrides(tiny_model_dir, pairs_file, tmp_path / "r", tmp_path / "c"), "train.lr=1"])
    assert rc == 2
    assert "unknown config key `train.lr`" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "what", "chosen": "yes", "rejected": "yes"}])
    rc = main(["train", *base_overrides(tiny_model_dir, bad, tmp_path / "r", tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:1" in err and "identical" in err


def test_data_show_prints_mask(tiny_model_dir, pairs_file, tmp_path, capsys):
    rc = main(
        ["data", "show", *base_overrides(tiny_model_dir, pairs_file, tmp_path / "r", tmp_path / "c"), "--index", "1"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "loaded 40 examples" in out
    assert "chosen:" in out and "rejected: 6 tokens (scored)" in out  # sorry i cannot help . <|im_end|>


def test_losses_and_help_config(capsys):
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    for name in ("dpo", "cdpo", "ipo", "hinge", "sft"):
        assert f"\n{name} " in "\n" + out
    assert "arXiv 2305.18290" in out
    assert main(["train", "--help-config"]) == 0
    assert "train.learning_rate" in capsys.readouterr().out
