import re

import pytest

from alignkit.config import RunConfig, field_docs, format_help, iter_fields, load_config, parse_override
from alignkit.errors import ConfigError


def test_defaults_and_yaml_and_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("recipe: sft\ntrain:\n  learning_rate: 1e-5\n  batch_size: 2\ndata:\n  train: x.jsonl\n")
    cfg = load_config(str(p), ["train.batch_size=4", "loss.beta=0.3", "lora.enabled=true"])
    assert cfg.recipe == "sft"
    assert cfg.train.learning_rate == 1e-5 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.batch_size == 4  # the override wins over the file
    assert cfg.loss == {"name": "sft", "beta": 0.3}  # a nameless loss is the recipe's own
    assert cfg.lora.enabled is True
    assert load_config(None, ["recipe=reward", "loss.center_weight=0.1"]).loss == {
        "name": "bradley_terry",
        "center_weight": 0.1,
    }
    assert load_config(None, ["recipe=negative"]).loss == {"name": "d2o"}
    assert load_config(None, []).loss == {"name": "dpo"}
    assert cfg.data.train == "x.jsonl" and cfg.data.max_length == 1024  # untouched default


def test_unknown_key_in_file_names_file_and_suggests(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  learning_rat: 1e-5\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown config key `train.learning_rat`.*`train.learning_rate`"):
        load_config(str(p))


def test_unknown_override_suggests_section_key():
    with pytest.raises(ConfigError, match="Did you mean `train.max_steps`"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="Did you mean `train.batch_size`"):
        load_config(None, ["batch_size=3"])  # right leaf, missing section


def test_type_and_choice_errors():
    with pytest.raises(ConfigError, match=r"`train.batch_size` must be a int; got 'big'"):
        load_config(None, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match=r"`recipe` must be one of sft, dpo"):
        load_config(None, ["recipe=ppx"])  # not a recipe (ppo is one now)
    with pytest.raises(ConfigError, match=r"`train.grad_accum` must be positive"):
        load_config(None, ["train.grad_accum=0"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.batch_size"])


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_every_field_has_a_doc_line():
    for key, _, _, doc in iter_fields():
        assert doc, f"config field {key} has no docstring line"
    assert "Peak learning rate" in field_docs(type(RunConfig().train))["learning_rate"]
    assert "train.learning_rate" in format_help()


def test_generated_docs_come_from_the_code():
    """docs/losses.md is current (`python scripts/gen_docs.py`); the configuration reference, the
    recipe table and the loss table exist only as markers that the site build renders from the code
    (scripts/mkdocs_hooks.py), and the README carries none of them."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_docs", root / "scripts" / "gen_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.loss_docs() == (root / "docs" / "losses.md").read_text(), "docs/losses.md is stale: run the script"
    config_page = (root / "docs" / "config.md").read_text()
    assert "<!-- generated:config-reference -->" in config_page
    rendered = mod.render(config_page, "docs/config.md")
    assert format_help(markdown=True) in rendered and "`train.learning_rate` | float | `5e-06`" in rendered
    training = mod.render((root / "docs" / "training.md").read_text())
    assert "| `grpo` | prompts | `ppo_clip` | yes |" in training and "| `simpo` | no | paired |" in training
    for name, table in mod.sections().items():  # a `|` in a cell (a type's `a | b`) must not split it
        widths = {len(re.split(r"(?<!\\)\|", re.sub(r"`[^`]*`", "x", row))) for row in table.splitlines()}
        assert len(widths) == 1, f"{name}: rows with different numbers of cells {widths}"
    assert "| sft \\| dpo \\| unpaired" in rendered and "KL(student \\|\\| teacher)" in training
    readme = (root / "README.md").read_text()
    assert "<!-- generated:" not in readme and "train.learning_rate` |" not in readme
    with pytest.raises(ValueError, match=r"x.md: unknown generated section\(s\) \['nope'\]"):
        mod.render("<!-- generated:nope -->\n", "x.md")


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("x=null") == ("x", None)
    assert parse_override("x=true") == ("x", True)


# -- the recipe registry decides what each recipe reads ----------------------------------------


@pytest.mark.parametrize(
    "recipe,override,key",
    [
        ("grpo", "reference=live", "reference"),
        ("grpo", "train.packing=false", "train.packing"),
        ("rloo", "online.scale_rewards=false", "online.scale_rewards"),
        ("dpo", "online.kl_coef=0.1", "online.kl_coef"),
        ("sft", "generation.num_samples=8", "generation.num_samples"),
        ("raft", "losses=[{name: sft, weight: 1.0}]", "losses"),
        ("dpo", "critic.learning_rate=1e-4", "critic.learning_rate"),
    ],
)
def test_a_key_the_recipe_does_not_read_is_an_error(recipe, override, key):
    extra = ["online.rewards=numeric_match"] if recipe in ("grpo", "rloo", "raft") else []
    with pytest.raises(ConfigError, match=rf"recipe {recipe} does not read `{key}`"):
        load_config(None, [f"recipe={recipe}", override, *extra])


def test_keys_at_their_defaults_pass_so_saved_configs_load_back(tmp_path):
    from alignkit.config import save_config

    cfg = load_config(None, ["recipe=grpo", "online.rewards=numeric_match", "loss.clip_high=0.28"])
    save_config(cfg, tmp_path / "c.yaml")  # lists every key, `reference` and `train.packing` included
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg and again.loss == {"name": "ppo_clip", "clip_high": 0.28}


def test_default_losses_come_from_the_registry():
    from alignkit.registries import recipes as registry

    for name, spec in registry.RECIPES.items():
        extra = ["online.rewards=numeric_match"] if spec.samples else []
        assert load_config(None, [f"recipe={name}", *extra]).loss == {"name": spec.default_loss}, name
    with pytest.raises(ConfigError, match="`online.clip_low` is now `loss.clip_low`"):
        load_config(None, ["recipe=grpo", "online.clip_low=0.1"])


def test_help_config_lists_recipes_and_who_reads_each_key(capsys):
    from alignkit.cli import main

    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "ppo         PPO (PPO-max)" in out
    assert "online.scale_rewards (bool, default True)  [recipes: grpo]" in out
    assert "critic.value_clip (float, default 0.2)  [recipes: ppo]" in out
    assert "train.learning_rate (float, default 5e-06)\n" in out  # every recipe reads it: no list


@pytest.mark.parametrize(
    "low,high,key",
    [
        (1.5, 2.0, "online.is_mask_low"),  # the low bound must be below 1
        (0.0, 2.0, "online.is_mask_low"),  # both are set, or neither
        (0.5, 0.0, "online.is_mask_high"),
        (0.5, 1.0, "online.is_mask_high"),  # the high bound must be above 1
    ],
)
def test_masked_importance_sampling_range_is_checked(low, high, key):
    base = ["recipe=grpo", "online.rewards=numeric_match"]
    with pytest.raises(ConfigError, match=rf"`{key}` must be"):
        load_config(None, [*base, f"online.is_mask_low={low}", f"online.is_mask_high={high}"])
    cfg = load_config(None, [*base, "online.is_mask_low=0.5", "online.is_mask_high=2.0", "online.tis_cap=2.0"])
    assert (cfg.online.is_mask_low, cfg.online.is_mask_high) == (0.5, 2.0)
    with pytest.raises(ConfigError, match=r"recipe dpo does not read `online.is_mask_high`.*`online.is_mask_low`"):
        load_config(None, ["recipe=dpo", "online.is_mask_low=0.5", "online.is_mask_high=2.0"])


def test_every_setting_is_read_by_some_recipe():
    """A setting no recipe reads can never be set (`check_reads` refuses it as having no effect):
    `generation.weight_transport` was such a key, so the NCCL transport could not be configured."""
    from alignkit.config import flat_dict, to_dict
    from alignkit.registries import recipes as registry

    keys = flat_dict(to_dict(RunConfig()))
    assert "generation.weight_transport" in keys
    assert [k for k in keys if not registry.readers(k)] == []
