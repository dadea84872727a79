"""The exporter contract, one suite for every (format, architecture) row: the manifest maps every Linear weight to
its exact bytes, the exported model matches PyTorch (full forward and KV-cache decode), SHiRA adapters switched in
by the runtime match PEFT's merged model, `switch(None)` restores the base bit for bit, `generate` equals
transformers' greedy decoding, and adapter-fused exports match PEFT.

A new architecture or backend is one more row in ROWS (plus a tiny model in conftest.make_tiny). Each row is
exported once per session (through `shira-edge export`) and shared by every test that reads it.
"""

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
from shira_edge.exporters.architecture import describe
from shira_edge.exporters.common import ExportError, Stages
from shira_edge.models import ModelInfo, load_model
from shira_edge.runtime.fingerprint import base_fingerprint, weight_digest
from shira_edge.runtime.manifest import read_manifest
from shira_edge.runtime.runtime import Runtime

from .conftest import make_tiny, make_tiny_opt

pytestmark = pytest.mark.slow
TOL = 1e-4
FORMATS = ("onnx", "executorch")
# (format, architecture family): tiny OPT; tiny Llama with GQA; tiny Qwen2 with q/k/v bias; Llama-3 rope scaling
# with an untied lm_head; Mistral with a sliding window shorter than the test prompts.
# ExecuTorch lowering is the slow part (~15 s a tiny model): the last two families run on ONNX only, since their
# differences (rope frequencies, window mask) live in decoder.py, which both backends share.
# ExecuTorch mistral: its 6-token sliding window falls inside the cache, so it is the row of the masked cache path
ROWS = [(fmt, arch) for arch in ("opt", "llama", "qwen2", "mistral") for fmt in FORMATS] + [("onnx", "llama3")]
# --fuse-qkv: q/k/v as one MatMul, each weight a slice (tensor_shape, out_offset) of qkv_proj; GQA and bias together
ROWS += [("onnx+fuse_qkv", "qwen2")]
ONNX_ROWS = [r for r in ROWS if r[0].startswith("onnx")]
ET_ROWS = [r for r in ROWS if r[0] == "executorch"]
# Fused exports: the adapter A fused in at export (a .shira file or the PEFT dir), per format and family.
FUSED_ROWS = [("onnx", "opt", "shira"), ("executorch", "opt", "peft"), ("onnx", "llama", "shira"),
              ("executorch", "llama", "peft"), ("onnx", "qwen2", "peft"), ("executorch", "qwen2", "shira")]
ADAPTER_TARGETS = {"opt": ["q_proj", "v_proj", "fc1"]}
LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj"]
OPT_ET_MAX_SEQ = 32   # the other ExecuTorch rows use the default, which must fit their 128 positions
PROMPT = [41, 7, 300, 11, 499, 9, 100, 3, 77, 250, 18]   # after bos; not the exporters' own parity prompts
# ONNX: 3 rows of different lengths (left padding). Row r starts with bos at column STARTS[r].
IDS = np.array([[0, 41, 7, 300, 11, 499, 9, 100],
                [0, 0, 0, 77, 250, 18, 64, 5],
                [0, 0, 0, 0, 0, 333, 12, 6]], dtype=np.int64)
STARTS = (0, 2, 4)


def row_id(row) -> str:
    return "-".join(row)


def export_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["export", *map(str, args)])
    return result.exit_code, result.output


class Zoo:
    """Tiny models, adapters and exports, each made once per session on first use."""

    def __init__(self, tmp_path_factory, tiny_opt_dir):
        self.tmp = tmp_path_factory
        self._made = {("dir", "opt"): tiny_opt_dir}

    def _once(self, key, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def model_dir(self, arch):
        def make():
            path = self.tmp.mktemp(f"tiny-{arch}")
            make_tiny(arch, seed=0).save_pretrained(path)
            return path
        return self._once(("dir", arch), make)

    def model(self, arch):
        """The base model as the exporter loads it (from the saved dir), fresh on every call."""
        return load_model(str(self.model_dir(arch)))[0].eval()

    def adapter(self, arch, which: str):
        """(PEFT dir, .shira file, PEFT-merged reference model) for adapter "A" or "B" (different masks/values)."""
        def make():
            from peft import PeftModel, ShiraConfig, get_peft_model

            from shira_edge.pack import pack_adapter

            seed = {"A": 0, "B": 1}[which]
            path = self.tmp.mktemp(f"adapter-{arch}-{which}")
            torch.manual_seed(seed)
            config = ShiraConfig(r=2, target_modules=ADAPTER_TARGETS.get(arch, LLAMA_TARGETS), init_weights=False,
                                 random_seed=seed)
            get_peft_model(self.model(arch), config).save_pretrained(path / "peft")
            merged = PeftModel.from_pretrained(self.model(arch), str(path / "peft")).merge_and_unload().eval()
            pack_adapter(path / "peft", path / f"{which}.shira", model=str(self.model_dir(arch)))
            return path / "peft", path / f"{which}.shira", merged
        return self._once(("adapter", arch, which), make)

    def export(self, fmt, arch, fused: str | None = None):
        def make():
            out = self.tmp.mktemp(f"{fmt}-{arch}-{fused or 'base'}") / "out"
            backend, *options = fmt.split("+")
            args = ["--model", self.model_dir(arch), "--format", backend, "-o", out]
            args += [f"--{o.replace('_', '-')}" for o in options]
            if fmt == "executorch" and arch == "opt":
                args += ["--max-seq-len", OPT_ET_MAX_SEQ]
            if fused:
                peft_dir, shira, _ = self.adapter(arch, "A")
                args += ["--adapter", shira if fused == "shira" else peft_dir]
            code, output = export_cli(*args)
            assert code == 0, output
            return out
        return self._once(("export", fmt, arch, fused), make)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, tiny_opt_dir):
    return Zoo(tmp_path_factory, tiny_opt_dir)


class Row:
    def __init__(self, zoo, fmt, arch):
        self.fmt, self.arch, self.zoo = fmt.split("+")[0], arch, zoo
        self.out = zoo.export(fmt, arch)
        self.fused = "fuse_qkv" in fmt
        self.manifest = read_manifest(self.out)
        self.model = zoo.model(arch)
        self.cfg = self.model.config

    def prompt(self, n: int = len(PROMPT) + 1) -> np.ndarray:
        return np.array([[self.cfg.bos_token_id, *PROMPT][:n]], dtype=np.int64)

    def patchable(self) -> list[dict]:
        return [w for w in self.manifest["weights"] if w["patchable"]]


@pytest.fixture(scope="session", params=ROWS, ids=row_id)
def row(request, zoo):
    return Row(zoo, *request.param)


@pytest.fixture(scope="session", params=ONNX_ROWS, ids=row_id)
def onnx_row(request, zoo):
    return Row(zoo, *request.param)


@pytest.fixture(scope="session", params=ET_ROWS, ids=row_id)
def et_row(request, zoo):
    return Row(zoo, *request.param)


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def stored(out, entry) -> np.ndarray:
    """An entry's bytes from its file, turned back into the PyTorch (out, in) weight through the manifest's weight
    map: tensor_shape, layout, and the output rows out_offset + row_perm[r] (slices of fused tensors)."""
    rows, cols = entry["shape"]
    shape = entry.get("tensor_shape") or ([rows, cols] if entry["layout"] == "as_is" else [cols, rows])
    tensor = np.fromfile(out / entry["file"], dtype="<f4", count=entry["nbytes"] // 4,
                         offset=entry["offset"]).reshape(shape)
    index = entry.get("out_offset", 0) + np.asarray(entry.get("row_perm") or range(rows))
    return tensor[index] if entry["layout"] == "as_is" else tensor[:, index].T


# ---------------------------------------------------------------- every row


def test_manifest_describes_the_export(row):
    m, model, cfg = row.manifest, row.model, row.cfg
    arch = describe(model)
    linears = {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert {w["name"] for w in m["weights"]} == linears
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == (row.arch not in ("llama3", "mistral"))   # the rows cover both kinds
    patchable = {w["name"] for w in row.patchable()}
    per_layer = 6 if row.arch == "opt" else 7
    assert len(patchable) == per_layer * cfg.num_hidden_layers + (0 if tied else 1)
    assert patchable == (linears - {"lm_head.weight"} if tied else linears)
    for i in range(cfg.num_hidden_layers):
        for path in arch.linears(i):
            assert f"{path}.weight" in patchable
    if tied:
        lm_head = next(w for w in m["weights"] if w["name"] == "lm_head.weight")
        assert f"tied to {arch.embed_tokens}.weight" in lm_head["note"]

    cache = m["io"]["cache"]
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    assert (cache["num_layers"], cache["num_heads"], cache["num_attention_heads"], cache["head_dim"]) == \
        (cfg.num_hidden_layers, kv_heads, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads)
    if row.arch != "opt":
        assert cache["num_heads"] < cache["num_attention_heads"]   # grouped-query attention reaches the manifest
    expected_len = {"onnx": cfg.max_position_embeddings,
                    "executorch": OPT_ET_MAX_SEQ if row.arch == "opt" else min(256, cfg.max_position_embeddings)}
    assert cache["max_seq_len"] == m["io"]["max_positions"] == expected_len[row.fmt]
    parity = m["export"]["parity"]
    assert parity["max_abs_diff_full"] <= TOL and parity["max_abs_diff_decode"] <= TOL
    assert set(m["export"]["stage_seconds"]) == {"load", "trace", "lower", "write", "verify"}
    assert m["export"]["architecture"]["model_type"] == cfg.model_type
    slices = [w for w in m["weights"] if "out_offset" in w]
    if row.fused:   # q, k, v of every layer: slices of one qkv_proj tensor each
        assert len(slices) == 3 * cfg.num_hidden_layers and m["export"]["fused"] == ["qkv"]
        assert {w["tensor"] for w in slices} == {f"{arch.layer(i, 'self_attn.qkv_proj')}.weight_t"
                                                 for i in range(cfg.num_hidden_layers)}
    else:
        assert slices == []
    if row.fmt == "onnx":
        assert m["backend"] == "onnxruntime" and cache["kind"] == "past_present"
        assert m["files"]["graph_optimization_level"] == onnx_verify.OPT_LEVEL
    else:
        assert m["backend"] == "executorch" and cache["kind"] == "static"
        assert (m["files"]["program"], m["files"]["data"]) == ("model.pte", "model.ptd")
        assert [i["name"] for i in m["io"]["inputs"]] == ["tokens", "input_pos"] and m["io"]["methods"] == ["forward"]
        assert {w["file"] for w in m["weights"]} == {"model.ptd"}
        # ExecuTorch's LLM kernels wherever no sliding window cuts inside the cache; mistral's does
        assert cache["kernels"] == ([] if row.arch == "mistral" else ["llama::update_cache", "llama::custom_sdpa"])


def test_every_weight_map_entry_is_byte_exact(row):
    params = dict(row.model.named_parameters(remove_duplicate=False))
    for entry in row.manifest["weights"]:
        weight = params[entry["name"]].detach().numpy()
        assert entry["shape"] == list(weight.shape), entry["name"]
        np.testing.assert_array_equal(stored(row.out, entry), weight, err_msg=entry["name"])
        assert entry["digest"] == weight_digest(weight), entry["name"]
        if row.fmt == "onnx":
            assert entry["offset"] % row.manifest["files"]["alignment"] == 0, entry["name"]
    assert row.manifest["fingerprint"] == base_fingerprint({w["name"]: (w["shape"], w["digest"])
                                                            for w in row.manifest["weights"]})


def test_logits_match_pytorch(row):
    ids = row.prompt()
    with Runtime(row.out) as rt:
        assert np.abs(rt.run(ids) - torch_logits(row.model, ids)).max() <= TOL


def test_kv_cache_decode_matches_full_forward(row):
    ids = row.prompt()
    with Runtime(row.out) as rt:
        full = rt.run(ids)
        # a longer, unrelated sequence first: its cache (slots, for a static cache) must not leak into the next one
        rt.step(np.array([[row.cfg.bos_token_id] + [5] * 20]), None)
        steps, cache = [], None
        for t in range(ids.shape[1]):   # one token per step from the very first
            logits, cache = rt.step(ids[:, t:t + 1], cache)
            steps.append(logits)
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= TOL


def test_switched_adapters_match_peft_and_switch_none_restores_bit_for_bit(row):
    ids = row.prompt()
    params = dict(row.model.named_parameters())
    with Runtime(row.out) as rt:
        rt.wait_ready()
        base = rt.run(ids)
        for which in ("A", "B"):
            _, shira, merged = row.zoo.adapter(row.arch, which)
            rt.switch(str(shira))
            rt.wait_ready()
            got = rt.run(ids)
            assert np.abs(got - torch_logits(merged, ids)).max() <= TOL, which
            assert np.abs(got - base).max() > 100 * TOL, which   # the adapter did change the model
        rt.switch(None)
        rt.wait_ready()
        for entry in row.patchable():
            np.testing.assert_array_equal(rt.weight(entry["name"]), params[entry["name"]].detach().numpy())
        assert np.array_equal(rt.run(ids), base)


def test_generate_equals_transformers_greedy_with_the_adapter_merged(row):
    ids = row.prompt(6)
    _, shira, merged = row.zoo.adapter(row.arch, "A")
    eos = row.cfg.eos_token_id
    with Runtime(row.out) as rt:
        rt.switch(str(shira))
        got = rt.generate(ids, max_new_tokens=10, eos_token_id=eos)
    with torch.no_grad():
        want = merged.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                               do_sample=False, max_new_tokens=10, eos_token_id=eos,
                               pad_token_id=row.cfg.pad_token_id)
    np.testing.assert_array_equal(got, want.numpy())


# ---------------------------------------------------------------- ONNX rows


def ort_session(out):
    """Plain ONNX Runtime on the export dir (ORT reads model.onnx.data itself), at the manifest's level."""
    return ort.InferenceSession(str(out / "model.onnx"), onnx_verify.session_options(),
                                providers=["CPUExecutionProvider"])


def padded_batch(cfg):
    ids = IDS.copy()
    mask = np.zeros_like(ids)
    for r, start in enumerate(STARTS):
        ids[r, :start] = 0 if cfg.pad_token_id is None else cfg.pad_token_id
        ids[r, start] = cfg.bos_token_id
        mask[r, start:] = 1
    return ids, mask, onnx_verify.positions_of(mask)


def test_padded_batch_logits_and_decode_match_pytorch(onnx_row):
    # Batch 3 with left padding through the graph's own inputs: mask, positions, past/present.
    ids, mask, pos = padded_batch(onnx_row.cfg)
    cache = onnx_row.manifest["io"]["cache"]
    sess, layers = ort_session(onnx_row.out), cache["num_layers"]
    real = mask.astype(bool)
    full, _ = onnx_verify.run(sess, layers, ids, mask, pos)
    assert np.abs(full - onnx_verify.torch_logits(onnx_row.model, ids, mask))[real].max() <= TOL
    steps, past = [], None
    for t in range(ids.shape[1]):   # one token per step from the very first, past_len 0 -> 7
        logits, past = onnx_verify.run(sess, layers, ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], past)
        steps.append(logits)
    assert past[0].shape == (3, cache["num_heads"], ids.shape[1], cache["head_dim"])
    assert np.abs(np.concatenate(steps, axis=1) - full)[real].max() <= TOL


def test_ort_optimization_keeps_one_copy_of_each_weight(onnx_row, tmp_path):
    # At the manifest's level ORT must not fold any weight into a second tensor (e.g. a transposed lm_head), which
    # would both cost memory and escape patching: its optimized graph holds exactly the exported 2-D initializers.
    import onnx

    out, manifest = onnx_row.out, onnx_row.manifest
    exported = {t.name for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer
                if len(t.dims) == 2}
    ort.InferenceSession(str(out / "model.onnx"), onnx_verify.session_options(str(tmp_path / "opt.onnx")),
                         providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph
    assert {t.name for t in optimized.initializer if len(t.dims) == 2} == exported
    assert {w["tensor"] for w in manifest["weights"]} <= exported


def test_in_place_patches_of_runtime_buffers_take_effect(onnx_row):
    # The runtime's contract: load each patchable weight into its own buffer, hand it to ORT with add_initializer
    # (with the manifest's session config), then patch the buffer in place. Logits must follow PyTorch's.
    model, manifest = copy.deepcopy(onnx_row.model), onnx_row.manifest
    ids, mask, pos = padded_batch(onnx_row.cfg)
    patched = onnx_verify.open_session(onnx_row.out, manifest["weights"])
    rng = np.random.default_rng(1)
    params = dict(model.named_parameters())
    for entry in onnx_row.patchable():
        buf, (rows, cols) = patched.buffers[entry["tensor"]], entry["shape"]
        r, c = rng.integers(0, rows, 5), rng.integers(0, cols, 5)
        delta = rng.normal(0, 0.5, 5).astype(np.float32)
        view = buf if entry["layout"] == "as_is" else buf.T
        view[entry.get("out_offset", 0) + r, c] += delta   # a slice of a fused tensor starts at out_offset
        with torch.no_grad():
            params[entry["name"]][torch.from_numpy(r), torch.from_numpy(c)] += torch.from_numpy(delta)
    logits, _ = onnx_verify.run(patched.session, manifest["io"]["cache"]["num_layers"], ids, mask, pos)
    assert np.abs(logits - onnx_verify.torch_logits(model, ids, mask))[mask.astype(bool)].max() <= TOL


@pytest.fixture(scope="session")
def peft_export(zoo, tmp_path_factory):
    """tiny OPT + adapter A's PEFT dir fused, with --targets and a model dir that has a tokenizer_config.json only."""
    peft_dir, _, _ = zoo.adapter("opt", "A")
    model_dir = tmp_path_factory.mktemp("with-tokenizer") / "tiny"
    shutil.copytree(zoo.model_dir("opt"), model_dir)
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    out = tmp_path_factory.mktemp("onnx") / "peft"
    code, output = export_cli("--model", model_dir, "--adapter", peft_dir, "--targets", "model.decoder.layers.0.fc1",
                              "-o", out)
    assert code == 0, output
    return out, read_manifest(out)


def test_peft_adapter_export_with_targets(peft_export, zoo):
    out, manifest = peft_export
    _, _, merged = zoo.adapter("opt", "A")
    ids, mask, pos = padded_batch(merged.config)
    logits, _ = onnx_verify.run(ort_session(out), manifest["io"]["cache"]["num_layers"], ids, mask, pos)
    assert np.abs(logits - onnx_verify.torch_logits(merged, ids, mask))[mask.astype(bool)].max() <= TOL
    assert manifest["export"]["adapter"]["kind"] == "peft"
    merged_params = dict(merged.named_parameters())
    for entry in manifest["weights"]:
        if entry["name"] in merged_params:
            assert entry["digest"] == weight_digest(merged_params[entry["name"]].detach().numpy()), entry["name"]
    # --targets restricted the patchable set; a tokenizer_config.json alone is no tokenizer, so none travelled
    # (exports that carry one: tests/test_generate.py)
    assert [w["name"] for w in manifest["weights"] if w["patchable"]] == ["model.decoder.layers.0.fc1.weight"]
    assert manifest["files"]["tokenizer"] is None and not (out / "tokenizer_config.json").exists()


# ---------------------------------------------------------------- ExecuTorch rows

_ALIVE: list[bytes] = []   # buffers handed to the loader: it keeps pointers into them, not references


def et_load(out, ptd: bytes | None = None):
    """Load model.pte with its weights from a file (ptd None) or from an in-memory buffer."""
    from executorch.extension.pybindings import portable_lib

    from shira_edge.runtime import et_compat

    if ptd is None:
        return portable_lib._load_for_executorch(str(out / "model.pte"), str(out / "model.ptd"))
    pte = (out / "model.pte").read_bytes()
    _ALIVE.extend([pte, ptd])
    return et_compat.load_from_buffer(pte, ptd)


def et_full(module, ids: torch.Tensor) -> torch.Tensor:
    return module.forward([ids, torch.arange(ids.shape[1])])[0].clone()


@pytest.mark.parametrize("from_buffer", [True, False], ids=["ptd-in-memory", "ptd-file"])
def test_patching_ptd_bytes_and_reloading_changes_output_to_patched_model(et_row, tmp_path, from_buffer):
    out, manifest = et_row.out, et_row.manifest
    arch = describe(et_row.model)
    chosen = {f"{arch.linears(0)[0]}.weight", f"{arch.linears(arch.num_layers - 1)[-1]}.weight"}
    ids = torch.from_numpy(et_row.prompt())
    original_module = et_load(out)     # stays loaded: a weight cache keyed at export time would serve it stale
    before = et_full(original_module, ids)

    patched_model = copy.deepcopy(et_row.model)
    ptd = bytearray((out / "model.ptd").read_bytes())
    rng = np.random.default_rng(0)
    for w in (w for w in manifest["weights"] if w["name"] in chosen):
        param = patched_model.get_parameter(w["name"])
        rows, cols = rng.integers(0, w["shape"][0], 20), rng.integers(0, w["shape"][1], 20)
        with torch.no_grad():
            param[rows, cols] += torch.from_numpy(rng.normal(0, 0.5, 20).astype(np.float32))
        buf = param.detach().numpy() if w["layout"] == "as_is" else param.detach().numpy().T
        ptd[w["offset"]: w["offset"] + w["nbytes"]] = np.ascontiguousarray(buf, dtype="<f4").tobytes()

    if from_buffer:
        reloaded = et_load(out, bytes(ptd))
    else:
        (tmp_path / "model.pte").write_bytes((out / "model.pte").read_bytes())
        (tmp_path / "model.ptd").write_bytes(bytes(ptd))
        reloaded = et_load(tmp_path)
    after = et_full(reloaded, ids)
    assert float((after - torch.from_numpy(torch_logits(patched_model, ids.numpy()))).abs().max()) <= TOL
    assert float((after - before).abs().max()) > 100 * TOL
    assert float((et_full(original_module, ids) - before).abs().max()) == 0.0   # the old one is untouched


def test_parity_check_fails_when_the_files_do_not_match_the_model(et_row):
    from shira_edge.exporters.executorch_export import executorch_parity

    other = copy.deepcopy(et_row.model)
    name = f"{describe(other).linears(1)[4]}.weight"   # layer 1's first MLP Linear
    with torch.no_grad():
        other.get_parameter(name)[0, :4] += 0.5
    with pytest.raises(ExportError, match="parity check failed"):
        executorch_parity(other, et_row.out, et_row.manifest["io"]["cache"]["max_seq_len"])


def test_weight_map_refuses_a_weight_the_ptd_does_not_hold(et_row):
    from shira_edge.exporters.executorch_export import locate_ptd_weights

    other = copy.deepcopy(et_row.model)
    name = f"{describe(other).linears(0)[2]}.weight"   # layer 0's v_proj
    with torch.no_grad():
        other.get_parameter(name)[3, 3] += 1.0
    with pytest.raises(ExportError, match=rf"{name.replace('.', '[.]')}: no tensor"):
        locate_ptd_weights(other, (et_row.out / "model.ptd").read_bytes())


def test_weights_with_identical_bytes_share_storage_and_are_not_patchable(et_row):
    # XNNPACK keys a weight by the hash of its bytes, so two equal weights become one stored tensor
    from shira_edge.exporters.executorch_export import locate_ptd_weights

    twin = copy.deepcopy(et_row.model)
    names = [f"{p}.weight" for p in describe(twin).linears(0)]
    shapes = [tuple(twin.get_parameter(n).shape) for n in names]
    a, b = next((x, y) for i, x in enumerate(names) for y in names[i + 1:] if shapes[names.index(y)] == shapes[i])
    other = next(n for n in names if n not in (a, b))
    with torch.no_grad():
        twin.get_parameter(b).copy_(twin.get_parameter(a))
    by_name = {w["name"]: w for w in locate_ptd_weights(twin, (et_row.out / "model.ptd").read_bytes())}
    assert by_name[a]["offset"] == by_name[b]["offset"]
    assert not by_name[a]["patchable"] and b in by_name[a]["note"]
    assert not by_name[b]["patchable"] and a in by_name[b]["note"]
    assert by_name[other]["patchable"]


def test_apply_targets_refuses_tied_and_non_linear(zoo):
    from shira_edge.exporters.common import apply_targets

    weights = read_manifest(zoo.export("executorch", "opt"))["weights"]
    apply_targets(copy.deepcopy(weights), ["model.decoder.layers.0.fc1"], "ExecuTorch")   # module or weight name
    with pytest.raises(ExportError, match="not patchable"):
        apply_targets(copy.deepcopy(weights), ["lm_head.weight"], "ExecuTorch")
    with pytest.raises(ExportError, match="not an nn.Linear weight"):
        apply_targets(copy.deepcopy(weights), ["model.decoder.layers.0.self_attn_layer_norm.weight"], "ExecuTorch")


# ---------------------------------------------------------------- fused exports and refusals


@pytest.mark.parametrize("fused_row", FUSED_ROWS, ids=row_id)
def test_fused_export_matches_peft_merged_model_not_the_base(zoo, fused_row):
    fmt, arch, kind = fused_row
    out = zoo.export(fmt, arch, fused=kind)
    manifest = read_manifest(out)
    _, _, merged = zoo.adapter(arch, "A")
    ids = np.array([[merged.config.bos_token_id, *PROMPT]], dtype=np.int64)
    with Runtime(out) as rt:
        got = rt.run(ids)
    assert np.abs(got - torch_logits(merged, ids)).max() <= TOL
    assert np.abs(got - torch_logits(zoo.model(arch), ids)).max() > 100 * TOL
    adapter = manifest["export"]["adapter"]
    assert adapter["kind"] == kind
    if kind == "shira":
        assert adapter["targets"] == 3 * merged.config.num_hidden_layers   # 3 target modules in every layer
    params = dict(merged.named_parameters())
    for entry in manifest["weights"]:
        if entry["name"] in params:
            assert entry["digest"] == weight_digest(params[entry["name"]].detach().numpy()), entry["name"]
        if entry["patchable"]:   # the fused weights (fp32 delta added once) equal PEFT's merge up to rounding
            np.testing.assert_allclose(stored(out, entry), params[entry["name"]].detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unsupported_architecture_is_refused_naming_it_and_the_supported_list(fmt, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from shira_edge.exporters.executorch_export import export_executorch
    from shira_edge.exporters.onnx_export import export_onnx

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    info = ModelInfo("gpt2-tiny", "test", "GPT2LMHeadModel", "random-init", 0)
    export = export_onnx if fmt == "onnx" else export_executorch
    with pytest.raises(ExportError, match="GPT2LMHeadModel.*'gpt2'.*not supported.*llama, mistral, opt, qwen2"):
        export(gpt2, info, tmp_path, stages=Stages(quiet=True))


@pytest.mark.parametrize("fmt", FORMATS)
def test_max_seq_len_above_the_models_positions_is_refused(fmt, tmp_path):
    from shira_edge.exporters.executorch_export import export_executorch
    from shira_edge.exporters.onnx_export import export_onnx

    model = make_tiny_opt()
    info = ModelInfo("tiny-opt", "test", "OPTForCausalLM", "random-init", 0)
    export = export_onnx if fmt == "onnx" else export_executorch
    with pytest.raises(ExportError, match=r"--max-seq-len 257 must be in 2\.\.256"):
        export(model, info, tmp_path, stages=Stages(quiet=True), max_seq_len=257)


def test_llm_kernels_are_refused_where_a_sliding_window_needs_the_mask(zoo, tmp_path):
    from shira_edge.exporters.common import ExportError, Stages
    from shira_edge.exporters.executorch_export import export_executorch
    from shira_edge.models import ModelInfo

    info = ModelInfo("tiny-mistral", "tests", "MistralForCausalLM", "random-init", 0)
    with pytest.raises(ExportError, match="sliding window of 6 inside the 32-slot cache"):
        export_executorch(zoo.model("mistral"), info, tmp_path, stages=Stages(quiet=True), max_seq_len=32,
                          llm_kernels=True)
