"""`export --from GENAI_DIR`: the weight map of an onnxruntime-genai builder folder, found by content.

The search itself is tested on plain arrays; the whole path runs the real builder on a tiny llama (skipped when
the optional `baselines` extra, onnxruntime-genai, is not installed).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from shira_edge.exporters.common import ExportError, Stages
from shira_edge.exporters.from_genai import Stored, export_from_genai, find
from tests.test_models import tiny_llama, tiny_tokenizer


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view("<u4")


def test_find_locates_slices_of_a_fused_transposed_tensor_and_plain_ones():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s, dtype=np.float32) for s in ((8, 6), (4, 6), (4, 6)))
    fused = Stored("qkv", "d", 0, _bits(np.concatenate([q, k, v]).T))     # stored (in, q+k+v), like the builder
    plain = Stored("o", "d", 0, _bits(q))
    assert [(t.name, layout, o) for t, layout, o in find(_bits(k), [fused, plain])] == [("qkv", "transposed", 8)]
    assert [(t.name, layout, o) for t, layout, o in find(_bits(q), [fused, plain])] == \
        [("qkv", "transposed", 0), ("o", "as_is", 0)]   # found twice: the caller refuses it as ambiguous
    other = v.copy()
    other[3, 5] = np.nextafter(other[3, 5], np.float32(1))   # one ulp off in the last element: not the weight
    assert find(_bits(other), [fused, plain]) == []


@pytest.fixture(scope="module")
def genai_folder(tmp_path_factory):
    pytest.importorskip("onnxruntime_genai", reason="pip install -e '.[baselines]' (onnxruntime-genai)")
    root = tmp_path_factory.mktemp("genai")
    model = tiny_llama(seed=0)
    model.save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")   # the builder copies the tokenizer and needs one
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(root / "hf"), "-o",
                    str(root / "built"), "-p", "fp32", "-e", "cpu", "-c", str(root / "cache")], check=True,
                   capture_output=True)
    return root, model


def test_builder_folder_maps_every_linear_weight_byte_exact(genai_folder, tmp_path):
    from shira_edge.models import ModelInfo
    from shira_edge.runtime.manifest import tensor_shape, validate

    root, model = genai_folder
    info = ModelInfo("tiny-llama", str(root / "hf"), "LlamaForCausalLM", "random-init", 0)
    manifest = export_from_genai(root / "built", model, info, tmp_path, stages=Stages(quiet=True), atol=1e-3)
    validate(manifest, export_dir=tmp_path)
    by_name = {w["name"]: w for w in manifest["weights"]}
    linear = [n for n, p in model.named_parameters(remove_duplicate=False) if n.endswith("proj.weight")]
    assert set(linear) <= set(by_name)
    cfg = model.config
    head = cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head, cfg.num_key_value_heads * head
    qkv = [by_name[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert len({w["tensor"] for w in qkv}) == 1 and [w["out_offset"] for w in qkv] == [0, q, q + kv]
    for w in manifest["weights"]:   # read each weight back from the copied file as the runtime maps it
        rows, cols = tensor_shape(w)
        t = np.fromfile(tmp_path / w["file"], "<f4", rows * cols, offset=w["offset"]).reshape(rows, cols)
        o, out = w.get("out_offset", 0), w["shape"][0]
        got = t[o:o + out] if w["layout"] == "as_is" else t[:, o:o + out].T
        want = dict(model.named_parameters(remove_duplicate=False))[w["name"]].detach().numpy()
        assert got.tobytes() == want.tobytes(), w["name"]
    assert manifest["io"]["cache"]["num_heads"] == cfg.num_key_value_heads
    assert manifest["io"]["cache"]["past"][:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert manifest["export"]["parity"]["max_abs_diff_decode"] <= 1e-3


def test_targets_keep_only_those_weights_patchable(genai_folder, tmp_path):
    from shira_edge.models import ModelInfo

    root, model = genai_folder
    down = "model.layers.0.mlp.down_proj.weight"
    info = ModelInfo("tiny-llama", str(root / "hf"), "LlamaForCausalLM", "random-init", 0)
    manifest = export_from_genai(root / "built", model, info, tmp_path, stages=Stages(quiet=True), atol=1e-3,
                                 targets=[down])
    assert [w["name"] for w in manifest["weights"] if w["patchable"]] == [down]


def test_cli_from_checks_parity_at_the_builder_tolerance_by_default(genai_folder, tmp_path):
    from click.testing import CliRunner

    from shira_edge.cli import main
    from shira_edge.exporters.from_genai import GENAI_ATOL
    from shira_edge.runtime.manifest import read_manifest

    root, _ = genai_folder
    result = CliRunner().invoke(main, ["export", "--from", str(root / "built"), "--model", str(root / "hf"), "-o",
                                       str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "out")["export"]["parity"]["atol"] == GENAI_ATOL


def test_a_different_model_is_refused_by_name(genai_folder, tmp_path):
    root, _ = genai_folder
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight .* found nowhere"):
        export_from_genai(root / "built", tiny_llama(seed=1), None, tmp_path, stages=Stages(quiet=True))


def test_a_folder_without_genai_config_says_what_it_needs(tmp_path):
    with pytest.raises(ExportError, match="no genai_config.json.*onnxruntime_genai.models.builder"):
        export_from_genai(tmp_path, None, None, tmp_path / "out", stages=Stages(quiet=True))


@pytest.fixture(scope="module")
def genai_export(genai_folder, tmp_path_factory):
    """The tiny builder folder with its manifest, as `export --from` writes it."""
    from shira_edge.models import ModelInfo
    from shira_edge.runtime.manifest import write_manifest

    root, model = genai_folder
    out = tmp_path_factory.mktemp("from-genai")
    info = ModelInfo("tiny-llama", str(root / "hf"), "LlamaForCausalLM", "random-init", 0)
    write_manifest(out, export_from_genai(root / "built", model, info, out, stages=Stages(quiet=True), atol=1e-3))
    return out, model


def test_runtime_runs_the_builder_graph_like_pytorch(genai_export):
    import torch

    from shira_edge.runtime import Runtime

    out, model = genai_export
    ids = np.array([[5, 9, 17, 33, 65, 129]])
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    with Runtime(out) as rt:
        prefill, cache = rt.step(ids[:, :4])
        decode, _ = rt.step(ids[:, 4:], cache)
    assert np.abs(np.concatenate([prefill, decode], axis=1) - want).max() < 1e-3


def test_switch_patches_fused_qkv_slices_and_restores_bit_for_bit(genai_export, tmp_path):
    from shira_edge.bench.adapters import write_random_shira
    from shira_edge.runtime import Runtime
    from shira_edge.runtime.manifest import read_manifest

    out, model = genai_export
    weights = [w for w in read_manifest(out)["weights"] if w["patchable"]]
    adapter = write_random_shira(tmp_path / "a.shira", weights, r=2, seed=0)
    names = [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"]
    with Runtime(out) as rt:
        base = {n: rt.weight(n) for n in names}
        rt.switch(adapter)
        rt.wait_ready()
        changed = {n: rt.weight(n) != base[n] for n in names}
        rt.switch(None)
        rt.wait_ready()
        restored = all(np.array_equal(rt.weight(n), base[n]) for n in names)
    assert all(c.any() for c in changed.values())     # every slice of the fused tensor got its own entries
    assert all(c.sum() <= 2 * sum(model.get_parameter(n).shape) for n, c in changed.items())   # and only those
    assert restored
