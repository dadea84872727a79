"""The package itself: light imports, model sources, the CLI's help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from shira_edge import models
from shira_edge.cli import COMMANDS, main

HEAVY = ("torch", "transformers", "peft")


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("module", ["shira_edge", "shira_edge.runtime", "shira_edge.runtime.fingerprint"])
def test_import_is_light(module):
    loaded = _modules_after_import(module)
    assert not [m for m in HEAVY if m in loaded], f"{module} imported {[m for m in HEAVY if m in loaded]}"


def test_runtime_package_never_imports_torch_transitively():
    # Every module under runtime/ is device code. Import them all in one fresh interpreter.
    code = (
        "import sys, pkgutil, importlib, json, shira_edge.runtime as r\n"
        "for m in pkgutil.iter_modules(r.__path__): importlib.import_module('shira_edge.runtime.' + m.name)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded = set(json.loads(out))
    assert not [m for m in HEAVY if m in loaded]


def test_cli_without_arguments_shows_help():
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 0
    assert "Usage:" in result.output and "Workflow" in result.output


def test_every_listed_command_has_help():
    runner = CliRunner()
    listed = main.list_commands(None)
    assert listed, "no commands are importable"
    for name in listed:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output
    assert set(listed) <= set(COMMANDS)


@pytest.mark.parametrize("name,kind", [("opt-125m", "alias"), ("tiny-opt", "alias"), ("facebook/opt-350m", "hub")])
def test_resolve(name, kind):
    assert models.resolve(name)[0] == kind


def test_unknown_model_names_the_choices():
    with pytest.raises(models.ModelNotAvailable, match="unknown model 'nope'.*opt-125m"):
        models.resolve("nope")


def test_local_directory_loads_through_from_pretrained(tiny_opt_dir):
    import torch

    from tests.conftest import make_tiny_opt

    model, info = models.load_model(str(tiny_opt_dir))
    assert info.weights == "pretrained" and info.seed is None and info.source == str(tiny_opt_dir)
    reference = make_tiny_opt(seed=0)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_offline_hub_id_fails_and_names_random_init(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(models.ModelNotAvailable, match="--random-init"):
        models.load_model("opt-125m")


def test_random_init_is_seeded_and_recorded():
    import torch

    a, info = models.load_model("tiny-opt", seed=3)
    b, _ = models.load_model("tiny-opt", seed=3)
    c, _ = models.load_model("tiny-opt", seed=4)
    assert info.weights == "random-init" and info.seed == 3
    w = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_opt_125m_random_init_has_the_real_shapes():
    from transformers import AutoConfig

    cfg = json.loads(models.resources.files("shira_edge").joinpath("configs", "opt-125m.json").read_text())
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    assert (config.num_hidden_layers, config.hidden_size, config.ffn_dim, config.num_attention_heads,
            config.vocab_size, config.max_position_embeddings) == (12, 768, 3072, 12, 50272, 2048)
