"""ExecuTorch export of the tiny OPT: weight map, logits and KV-cache parity, and patch-then-reload through the real
ExecuTorch runtime (XNNPACK). One session-scoped export (~40 s on 2 idle cores) serves every test: it goes through
`shira-edge export --format executorch --adapter <PEFT SHiRA dir>`, so PEFT's merged model is the reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from shira_edge.exporters.common import ExportError, Stages
from shira_edge.exporters.executorch_export import (
    DATA_FILE,
    PARITY_TOL,
    PROGRAM_FILE,
    executorch_parity,
    export_executorch,
    locate_ptd_weights,
)
from shira_edge.runtime.manifest import read_manifest
from shira_edge.models import ModelInfo
from shira_edge.runtime.fingerprint import base_fingerprint, weight_digest

from .conftest import make_tiny_opt
from .test_export_contract import export_cli, peft_adapter  # noqa: F401  (peft_adapter is a fixture used below)

pytestmark = pytest.mark.slow
MAX_SEQ = 32
PROMPT = [2, 41, 7, 300, 11, 499, 9, 100, 3, 77, 250, 18]   # not the exporter's own parity prompt


@pytest.fixture(scope="session")
def et_export(peft_adapter, tiny_opt_dir, tmp_path_factory):
    """(export dir, the PEFT-merged PyTorch model it was made from)."""
    adapter_dir, merged = peft_adapter
    out = tmp_path_factory.mktemp("tiny-et") / "out"
    code, output = export_cli("--model", tiny_opt_dir, "--format", "executorch", "--adapter", adapter_dir,
                              "--max-seq-len", MAX_SEQ, "-o", out)
    assert code == 0, output
    return out, merged


def _copy(model):
    return copy.deepcopy(model).eval()


_ALIVE: list[bytes] = []   # buffers handed to the loader: it keeps pointers into them, not references


def _load(out, ptd: bytes | None = None):
    """Load model.pte with its weights from a file (ptd None) or from an in-memory buffer."""
    from executorch.extension.pybindings import portable_lib

    if ptd is None:
        return portable_lib._load_for_executorch(str(out / PROGRAM_FILE), str(out / DATA_FILE))
    pte = (out / PROGRAM_FILE).read_bytes()
    _ALIVE.extend([pte, ptd])
    return portable_lib._load_for_executorch_from_buffer(pte, ptd)


def _full(module, ids):
    return module.forward([ids, torch.arange(ids.shape[1])])[0].clone()


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_manifest_covers_every_linear_with_exact_bytes(et_export):
    out, model = et_export
    manifest = read_manifest(out)
    assert manifest["backend"] == "executorch"
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {w["name"] for w in manifest["weights"]} == linears
    ptd = (out / DATA_FILE).read_bytes()
    sd = model.state_dict()
    for w in manifest["weights"]:
        stored = np.frombuffer(ptd, dtype="<f4", count=w["nbytes"] // 4, offset=w["offset"])
        ref = sd[w["name"]].numpy()
        ref = ref if w["layout"] == "as_is" else ref.T
        assert w["file"] == DATA_FILE and w["shape"] == list(sd[w["name"]].shape)
        np.testing.assert_array_equal(stored, ref.reshape(-1), err_msg=w["name"])
        assert w["digest"] == weight_digest(sd[w["name"]].numpy())
    assert manifest["fingerprint"] == base_fingerprint({w["name"]: (w["shape"], w["digest"]) for w in manifest["weights"]})


def test_tied_lm_head_is_not_patchable_and_the_rest_are(et_export):
    out, _ = et_export
    by_name = {w["name"]: w for w in read_manifest(out)["weights"]}
    lm = by_name.pop("lm_head.weight")
    assert lm["patchable"] is False and "model.decoder.embed_tokens.weight" in lm["note"]
    assert all(w["patchable"] for w in by_name.values()), [w["name"] for w in by_name.values() if not w["patchable"]]


def test_io_and_files_tell_the_runtime_what_it_needs(et_export):
    out, _ = et_export
    m = read_manifest(out)
    assert (m["files"]["program"], m["files"]["data"]) == (PROGRAM_FILE, DATA_FILE)
    assert [i["name"] for i in m["io"]["inputs"]] == ["tokens", "input_pos"]
    assert m["io"]["cache"]["max_seq_len"] == MAX_SEQ and m["io"]["methods"] == ["forward"]
    parity = m["export"]["parity"]
    assert parity["max_abs_diff_full"] <= PARITY_TOL and parity["max_abs_diff_decode"] <= PARITY_TOL


def test_exported_logits_match_pytorch(et_export):
    out, model = et_export
    ids = torch.tensor([PROMPT])
    got = _full(_load(out), ids)
    assert float((got - _torch_logits(model, ids)).abs().max()) <= PARITY_TOL


def test_adapter_export_matches_peft_merged_model_not_the_base(et_export):
    out, merged = et_export
    assert read_manifest(out)["export"]["adapter"]["kind"] == "peft"
    ids = torch.tensor([PROMPT])
    got = _full(_load(out), ids)
    assert float((got - _torch_logits(merged, ids)).abs().max()) <= PARITY_TOL
    assert float((got - _torch_logits(make_tiny_opt(seed=0), ids)).abs().max()) > 100 * PARITY_TOL


def test_kv_cache_decode_matches_full_forward(et_export):
    out, model = et_export
    ids = torch.tensor([PROMPT])
    ref = _torch_logits(model, ids)
    module = _load(out)
    # a longer, unrelated sequence first: its stale cache slots must not leak into the next one
    module.forward([torch.tensor([[2] + [5] * 20]), torch.arange(21)])
    steps = [module.forward([ids[:, :3], torch.arange(3)])[0].clone()]
    for p in range(3, ids.shape[1]):
        steps.append(module.forward([ids[:, p: p + 1], torch.tensor([p])])[0].clone())
    assert float((torch.cat(steps, dim=1) - ref).abs().max()) <= PARITY_TOL


@pytest.mark.parametrize("from_buffer", [True, False], ids=["ptd-in-memory", "ptd-file"])
def test_patching_ptd_bytes_and_reloading_changes_output_to_patched_model(et_export, tmp_path, from_buffer):
    out, model = et_export
    manifest = read_manifest(out)
    ids = torch.tensor([PROMPT])
    original_module = _load(out)       # stays loaded: a weight cache keyed at export time would serve it stale
    before = _full(original_module, ids)

    patched_model = _copy(model)
    ptd = bytearray((out / DATA_FILE).read_bytes())
    rng = np.random.default_rng(0)
    for w in manifest["weights"]:
        if not w["name"].endswith(("layers.0.self_attn.q_proj.weight", "layers.1.fc2.weight")):
            continue
        param = patched_model.get_parameter(w["name"])
        rows = rng.integers(0, w["shape"][0], 20)
        cols = rng.integers(0, w["shape"][1], 20)
        with torch.no_grad():
            param[rows, cols] += torch.from_numpy(rng.normal(0, 0.5, 20).astype(np.float32))
        buf = param.detach().numpy() if w["layout"] == "as_is" else param.detach().numpy().T
        ptd[w["offset"]: w["offset"] + w["nbytes"]] = np.ascontiguousarray(buf, dtype="<f4").tobytes()

    ptd_bytes = bytes(ptd)
    if from_buffer:
        reloaded = _load(out, ptd_bytes)
    else:
        (tmp_path / PROGRAM_FILE).write_bytes((out / PROGRAM_FILE).read_bytes())
        (tmp_path / DATA_FILE).write_bytes(ptd_bytes)
        reloaded = _load(tmp_path)
    after = _full(reloaded, ids)
    expected = _torch_logits(patched_model, ids)
    assert float((after - expected).abs().max()) <= PARITY_TOL
    assert float((after - before).abs().max()) > 100 * PARITY_TOL
    assert float((_full(original_module, ids) - before).abs().max()) == 0.0   # the old one is untouched


def test_parity_check_fails_when_the_files_do_not_match_the_model(et_export):
    out, model = et_export
    other = _copy(model)
    with torch.no_grad():
        other.get_parameter("model.decoder.layers.1.fc1.weight")[0, :4] += 0.5
    with pytest.raises(ExportError, match="parity check failed"):
        executorch_parity(other, out, MAX_SEQ)


def test_weight_map_refuses_a_weight_the_ptd_does_not_hold(et_export):
    out, model = et_export
    other = _copy(model)
    with torch.no_grad():
        other.get_parameter("model.decoder.layers.0.self_attn.v_proj.weight")[3, 3] += 1.0
    with pytest.raises(ExportError, match=r"layers\.0\.self_attn\.v_proj\.weight: no tensor"):
        locate_ptd_weights(other, (out / DATA_FILE).read_bytes())


def test_weights_with_identical_bytes_share_storage_and_are_not_patchable(et_export):
    # XNNPACK keys a weight by the hash of its bytes, so two equal weights become one stored tensor
    out, model = et_export
    twin = _copy(model)
    q, k = "model.decoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.0.self_attn.k_proj.weight"
    with torch.no_grad():
        twin.get_parameter(k).copy_(twin.get_parameter(q))
    by_name = {w["name"]: w for w in locate_ptd_weights(twin, (out / DATA_FILE).read_bytes())}
    assert by_name[q]["offset"] == by_name[k]["offset"]
    assert not by_name[q]["patchable"] and k in by_name[q]["note"]
    assert not by_name[k]["patchable"] and q in by_name[k]["note"]
    assert by_name["model.decoder.layers.0.self_attn.v_proj.weight"]["patchable"]


def test_check_targets_refuses_tied_and_non_linear(et_export):
    from shira_edge.exporters.common import apply_targets

    weights = read_manifest(et_export[0])["weights"]
    apply_targets(copy.deepcopy(weights), ["model.decoder.layers.0.fc1"], "ExecuTorch")  # module or weight name
    with pytest.raises(ExportError, match="not patchable"):
        apply_targets(copy.deepcopy(weights), ["lm_head.weight"], "ExecuTorch")
    with pytest.raises(ExportError, match="not an nn.Linear weight"):
        apply_targets(copy.deepcopy(weights), ["model.decoder.layers.0.self_attn_layer_norm.weight"], "ExecuTorch")


def test_non_opt_model_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    info = ModelInfo("gpt2-tiny", "test", "GPT2LMHeadModel", "random-init", 0)
    with pytest.raises(ExportError, match="GPT2LMHeadModel.*'gpt2'.*not supported.*supported model_types: .*opt"):
        export_executorch(gpt2, info, tmp_path, stages=Stages(quiet=True))
