"""ONNX export of the tiny OPT through `shira-edge export`: the manifest maps every Linear to the exact bytes, ONNX
Runtime matches PyTorch (full forward and KV-cache decode), patches made in place in runtime-owned buffers take
effect, and adapter exports (.shira file and PEFT dir) match PEFT's merged model. Two session-scoped exports."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from shira_edge.cli import main
from shira_edge.exporters import onnx_verify
from shira_edge.runtime.manifest import read_manifest
from shira_edge.models import load_model
from shira_edge.runtime.fingerprint import base_fingerprint, weight_digest

pytestmark = pytest.mark.slow
TOL = 1e-4
# Not the exporter's own parity prompt: 3 rows of different lengths (left padding), other tokens.
IDS = np.array([[2, 41, 7, 300, 11, 499, 9, 100],
                [1, 1, 2, 77, 250, 18, 64, 5],
                [1, 1, 1, 1, 2, 333, 12, 6]], dtype=np.int64)
MASK = (np.cumsum(IDS == 2, axis=1) > 0).astype(np.int64)
POS = (np.cumsum(MASK, axis=1) * MASK - 1).astype(np.int64)


def export_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["export", *map(str, args)])
    return result.exit_code, result.output


@pytest.fixture(scope="session")
def peft_adapter(tiny_opt_dir, tmp_path_factory):
    """A tiny PEFT SHiRA adapter with random (non-zero) values on q/v/fc1, and its PEFT-merged reference model."""
    from peft import PeftModel, ShiraConfig, get_peft_model

    path = tmp_path_factory.mktemp("adapter") / "peft"
    base, _ = load_model(str(tiny_opt_dir))
    config = ShiraConfig(r=2, target_modules=["q_proj", "v_proj", "fc1"], init_weights=False, random_seed=0)
    get_peft_model(base, config).save_pretrained(path)
    fresh, _ = load_model(str(tiny_opt_dir))
    merged = PeftModel.from_pretrained(fresh, str(path)).merge_and_unload().eval()
    return path, merged


@pytest.fixture(scope="session")
def base_export(peft_adapter, tiny_opt_dir, tmp_path_factory):
    """The tiny OPT with the adapter's .shira file fused in, exported through the CLI; the reference is PEFT's
    merged model. (One export serves the manifest, parity, decode, patching and .shira tests: exports are slow.)"""
    from shira_edge.commands.pack import pack_adapter

    path, merged = peft_adapter
    tmp = tmp_path_factory.mktemp("onnx")
    pack_adapter(path, tmp / "a.shira", model=str(tiny_opt_dir))
    code, output = export_cli("--model", tiny_opt_dir, "--adapter", tmp / "a.shira", "-o", tmp / "out")
    assert code == 0, output
    return tmp / "out", read_manifest(tmp / "out"), merged


def hf_logits(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def session(out):
    """Plain ONNX Runtime on the export dir (ORT reads model.onnx.data itself), at the manifest's level."""
    return ort.InferenceSession(str(out / "model.onnx"), onnx_verify.session_options(),
                                providers=["CPUExecutionProvider"])


def stored(out, entry) -> np.ndarray:
    """An entry's bytes from the data file, turned back into the PyTorch (out, in) weight through its layout."""
    rows, cols = entry["shape"]
    flat = np.fromfile(out / entry["file"], dtype="<f4", count=entry["nbytes"] // 4, offset=entry["offset"])
    return flat.reshape(rows, cols) if entry["layout"] == "as_is" else flat.reshape(cols, rows).T


def test_manifest_covers_every_linear(base_export):
    out, manifest, model = base_export
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {w["name"] for w in manifest["weights"]} == linears
    patchable = {w["name"] for w in manifest["weights"] if w["patchable"]}
    layers = model.config.num_hidden_layers
    assert len(patchable) == 6 * layers and "lm_head.weight" not in patchable
    for i in range(layers):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"):
            assert f"model.decoder.layers.{i}.{proj}.weight" in patchable
    lm_head = next(w for w in manifest["weights"] if w["name"] == "lm_head.weight")
    assert "tied to model.decoder.embed_tokens.weight" in lm_head["note"]
    assert manifest["files"]["graph_optimization_level"] == onnx_verify.OPT_LEVEL
    assert manifest["backend"] == "onnxruntime"
    parity = manifest["export"]["parity"]
    assert parity["max_abs_diff_full"] <= TOL and parity["max_abs_diff_decode"] <= TOL
    assert set(manifest["export"]["stage_seconds"]) == {"load", "trace", "lower", "write", "verify"}


def test_each_entry_bytes_equal_the_weight(base_export):
    out, manifest, model = base_export
    params = dict(model.named_parameters(remove_duplicate=False))
    for entry in manifest["weights"]:
        weight = params[entry["name"]].detach().numpy()
        assert entry["offset"] % manifest["files"]["alignment"] == 0, entry["name"]
        np.testing.assert_array_equal(stored(out, entry), weight, err_msg=entry["name"])
        assert entry["digest"] == weight_digest(weight), entry["name"]
    assert manifest["fingerprint"] == base_fingerprint({w["name"]: (w["shape"], w["digest"])
                                                        for w in manifest["weights"]})


def test_ort_optimization_keeps_one_copy_of_each_weight(base_export, tmp_path):
    # At the manifest's level ORT must not fold any weight into a second tensor (e.g. a transposed lm_head), which
    # would both cost memory and escape patching: its optimized graph holds exactly the exported 2-D initializers.
    import onnx

    out, manifest, _ = base_export
    exported = {t.name for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer
                if len(t.dims) == 2}
    ort.InferenceSession(str(out / "model.onnx"), onnx_verify.session_options(str(tmp_path / "opt.onnx")),
                         providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph
    assert {t.name for t in optimized.initializer if len(t.dims) == 2} == exported
    assert {w["tensor"] for w in manifest["weights"]} <= exported


def test_logits_match_pytorch(base_export):
    out, manifest, model = base_export
    logits, _ = onnx_verify.run(session(out), manifest["io"]["cache"]["num_layers"], IDS, MASK, POS)
    real = MASK.astype(bool)
    assert np.abs(logits - hf_logits(model))[real].max() <= TOL


def test_kv_cache_decode_matches_full_forward(base_export):
    out, manifest, _ = base_export
    sess, layers = session(out), manifest["io"]["cache"]["num_layers"]
    full, _ = onnx_verify.run(sess, layers, IDS, MASK, POS)
    steps, past = [], None
    for t in range(IDS.shape[1]):  # one token per step from the very first, past_len 0 -> 7
        logits, past = onnx_verify.run(sess, layers, IDS[:, t:t + 1], MASK[:, :t + 1], POS[:, t:t + 1], past)
        steps.append(logits)
    assert past[0].shape == (3, manifest["io"]["cache"]["num_heads"], IDS.shape[1],
                             manifest["io"]["cache"]["head_dim"])
    real = MASK.astype(bool)
    assert np.abs(np.concatenate(steps, axis=1) - full)[real].max() <= TOL


def test_in_place_patches_of_runtime_buffers_take_effect(base_export):
    # The runtime's contract: load each patchable weight into its own buffer, hand it to ORT with add_initializer
    # (with the manifest's session config), then patch the buffer in place. Logits must follow PyTorch's.
    out, manifest, merged = base_export
    model = copy.deepcopy(merged)
    patched = onnx_verify.open_session(out, manifest["weights"])
    rng = np.random.default_rng(1)
    params = dict(model.named_parameters())
    for entry in (w for w in manifest["weights"] if w["patchable"]):
        buf, (rows, cols) = patched.buffers[entry["tensor"]], entry["shape"]
        r, c = rng.integers(0, rows, 5), rng.integers(0, cols, 5)
        delta = rng.normal(0, 0.5, 5).astype(np.float32)
        view = buf if entry["layout"] == "as_is" else buf.T
        view[r, c] += delta
        with torch.no_grad():
            params[entry["name"]][torch.from_numpy(r), torch.from_numpy(c)] += torch.from_numpy(delta)
    logits, _ = onnx_verify.run(patched.session, manifest["io"]["cache"]["num_layers"], IDS, MASK, POS)
    real = MASK.astype(bool)
    assert np.abs(logits - hf_logits(model))[real].max() <= TOL


@pytest.fixture(scope="session")
def peft_export(peft_adapter, tiny_opt_dir, tmp_path_factory):
    path, _ = peft_adapter
    model_dir = tmp_path_factory.mktemp("with-tokenizer") / "tiny"
    shutil.copytree(tiny_opt_dir, model_dir)
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    out = tmp_path_factory.mktemp("onnx") / "peft"
    code, output = export_cli("--model", model_dir, "--adapter", path, "--targets", "model.decoder.layers.0.fc1",
                              "-o", out)
    assert code == 0, output
    return out, read_manifest(out)


def test_peft_adapter_export_matches_merged_model(peft_export, peft_adapter):
    out, manifest = peft_export
    _, merged = peft_adapter
    logits, _ = onnx_verify.run(session(out), manifest["io"]["cache"]["num_layers"], IDS, MASK, POS)
    assert np.abs(logits - hf_logits(merged))[MASK.astype(bool)].max() <= TOL
    assert manifest["export"]["adapter"]["kind"] == "peft"
    merged_params = dict(merged.named_parameters())
    for entry in manifest["weights"]:
        if entry["name"] in merged_params:
            assert entry["digest"] == weight_digest(merged_params[entry["name"]].detach().numpy()), entry["name"]
    # --targets restricted the patchable set; a tokenizer_config.json alone is no tokenizer, so none travelled
    # (exports that carry one: tests/test_generate.py)
    assert [w["name"] for w in manifest["weights"] if w["patchable"]] == ["model.decoder.layers.0.fc1.weight"]
    assert manifest["files"]["tokenizer"] is None and not (out / "tokenizer_config.json").exists()


def test_shira_file_export_matches_merged_model(base_export):
    out, manifest, merged = base_export
    adapter = manifest["export"]["adapter"]
    assert adapter["kind"] == "shira" and adapter["targets"] == 2 * 3  # q, v, fc1 in 2 layers
    params = dict(merged.named_parameters())
    for entry in manifest["weights"]:
        if entry["patchable"]:  # the fused weights (fp32 delta added once) equal PEFT's merge up to rounding
            np.testing.assert_allclose(stored(out, entry), params[entry["name"]].detach().numpy(), atol=1e-6)
