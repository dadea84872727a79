"""manifest.json is untrusted input (a device receives the export over the air): every way to break it, tamper
with it or point it outside the export dir ends in one ManifestError naming the field, before anything is loaded.

Each case edits a copy of the session's tiny ONNX (or ExecuTorch) export. Edits recompute the fingerprint, so the
check under test is the one that fires (the fingerprint case excepted)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from shira_edge.runtime.fingerprint import base_fingerprint
from shira_edge.runtime.manifest import ManifestError, read_manifest, validate

CONTROL = "\x1b[2J\x1b]0;pwned\x07\r\u202e"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write(d: Path, m: dict, refingerprint: bool = True) -> None:
    if refingerprint:
        m["fingerprint"] = base_fingerprint({w["name"]: (w["shape"], w["digest"]) for w in m["weights"]})
    (d / "manifest.json").write_text(json.dumps(m))


def _patchable(m: dict) -> list[int]:
    return [i for i, w in enumerate(m["weights"]) if w["patchable"]]


def _set(path: str, value):
    """An edit that sets m[a][b]... (ints index lists) to value."""
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]

    def edit(m, d):
        obj = m
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value
    return edit


def _delete(path: str):
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]

    def edit(m, d):
        obj = m
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]
    return edit


def _duplicate_name(m, d):
    twin = copy.deepcopy(m["weights"][1])
    twin["name"] = m["weights"][0]["name"]
    m["weights"].append(twin)


def _second_weight_on_one_tensor(m, d):
    i = _patchable(m)[0]
    twin = copy.deepcopy(m["weights"][i])
    twin["name"] = "model.extra.weight"
    m["weights"].append(twin)


def _overlapping_bytes(m, d):
    i, j = _patchable(m)[:2]
    m["weights"][j]["offset"] = m["weights"][i]["offset"] + 4 * 8


def _fused_slices(overlap: bool):
    """A patchable weight split into two output halves of its one tensor, as a fused qkv's slices are."""
    def edit(m, d):
        w = m["weights"][_patchable(m)[0]]
        out, inp = w["shape"]
        half = out // 2
        rows, cols = (out, inp) if w["layout"] == "as_is" else (inp, out)
        for k, start in ((0, 0), (1, half // 2 if overlap else half)):
            e = w if k == 0 else copy.deepcopy(w)
            e["shape"] = [half, inp]
            e["tensor_shape"] = [rows, cols]
            e["out_offset"] = start
            if k:
                e["name"] = w["name"] + ".second_half"
                m["weights"].append(e)
    return edit


def _symlink_out(m, d):
    outside = d.parent / f"{d.name}-outside.data"
    shutil.copy(d / m["weights"][0]["file"], outside)
    (d / "link.data").symlink_to(outside)
    for w in m["weights"]:
        w["file"] = "link.data"


def _tensor_missing(m, d):
    m["weights"][_patchable(m)[0]]["tensor"] = "no_such_initializer"


def _huge_but_consistent(m, d):   # 1 PiB, nbytes agreeing: only the file's size can refuse it
    w = m["weights"][0]
    w["shape"], w["layout"] = [1 << 25, 1 << 23], "as_is"
    w.pop("tensor_shape", None)
    w["nbytes"] = 4 << 48


def _inputs_disagree(m, d):   # a non-square weight whose tensor_shape swaps in and out (nbytes still agrees)
    w = next(w for w in m["weights"] if w["shape"][0] != w["shape"][1])
    w["tensor_shape"] = w["shape"] if w["layout"] == "transposed" else w["shape"][::-1]


def _control_chars_in_name(m, d):
    m["weights"][0]["name"] = CONTROL
    m["weights"][1]["name"] = CONTROL


def _tokenizer_fifo(m, d):
    os.mkfifo(d / "tokenizer.json")
    m["files"]["tokenizer"] = "tokenizer.json"


def _replace_file(content: bytes):
    return lambda m, d: (d / "manifest.json").write_bytes(content)


def _fifo(m, d):
    (d / "manifest.json").unlink()
    os.mkfifo(d / "manifest.json")


# case id -> (edit(manifest, export_dir), how the manifest is then written, words the error must contain).
# "fp": written with a recomputed fingerprint; "as-is": written as edited; "raw": the edit wrote the file itself.
CASES = {
    "not-json": (_replace_file(b'{"format_version": 1,'), "raw", ["manifest.json", "not valid JSON"]),
    "not-utf8": (_replace_file(b'{"backend": "\xff\xfe"}'), "raw", ["not UTF-8 (byte 13)"]),
    "deep-nesting": (_replace_file(b"[" * 100_000 + b"]" * 100_000), "raw", ["nested too deeply"]),
    "duplicate-json-key": (_replace_file(b'{"backend": "onnxruntime", "backend": "executorch"}'), "raw",
                           ["'backend' appears twice"]),
    "nan-literal": (_replace_file(b'{"format_version": NaN}'), "raw", ["NaN is not allowed"]),
    "fifo": (_fifo, "raw", ["not a regular file (a FIFO)"]),
    "top-level-list": (_replace_file(b"[]"), "raw", ["top level: must be a JSON object"]),
    "format-version": (_set("format_version", 2), "fp", ["format_version: 2 is not supported"]),
    "backend": (_set("backend", "tflite"), "fp", ["backend: 'tflite' is not one of"]),
    "missing-digest": (_delete("weights.0.digest"), "as-is", ["weights[0] (", ".digest: missing"]),
    "shape-as-string": (_set("weights.0.shape", "32x32"), "as-is", [".shape: '32x32' is not [out, in]"]),
    "offset-bool": (_set("weights.0.offset", True), "fp", [".offset: True is not a non-negative integer"]),
    "offset-negative": (_set("weights.0.offset", -4), "fp", [".offset: -4 is not a non-negative integer"]),
    "offset-unaligned": (_set("weights.0.offset", 6), "fp", [".offset: 6 is not a multiple of"]),
    "offset-beyond-file": (_set("weights.0.offset", 1 << 40), "fp", [".offset: bytes 1099511627776..",
                                                                     "beyond the end of 'model.onnx.data'"]),
    "shape-absurd": (_set("weights.0.shape", [1 << 40, 1 << 40]), "fp", [".shape: [1099511627776"]),
    "petabyte-weight": (_huge_but_consistent, "fp", [".offset: bytes", "beyond the end of 'model.onnx.data'"]),
    "nbytes-vs-shape": (_set("weights.0.nbytes", 12), "fp", [".nbytes: 12 does not hold a"]),
    "float16": (_set("weights.0.dtype", "float16"), "fp", [".dtype: 'float16' is not supported",
                                                             "re-export in float32"]),
    "duplicate-name": (_duplicate_name, "fp", ["weights[", "is also weights[0]; each weight appears once"]),
    "two-weights-one-tensor": (_second_weight_on_one_tensor, "fp", [".out_offset: output rows 0..", "overlap"]),
    "overlapping-bytes": (_overlapping_bytes, "fp", [".offset: bytes", "overlap weights["]),
    "fused-slices-overlap": (_fused_slices(overlap=True), "fp", [".out_offset: output rows", "overlap"]),
    "out-offset-too-far": (_set("weights.0.out_offset", 1), "fp", [".out_offset: rows 1..", "do not fit"]),
    "row-perm-not-permutation": (_set("weights.0.row_perm", [0] * 4), "fp",
                                 [".row_perm: must be a permutation of range("]),
    "tensor-shape-nbytes": (_set("weights.0.tensor_shape", [1, 1]), "fp", [".nbytes: ", "does not hold a 1x1"]),
    "tensor-shape-inputs": (_inputs_disagree, "fp", [".tensor_shape: ", "inputs, the weight has"]),
    "path-dotdot": (_set("weights.0.file", "../model.onnx.data"), "fp", [".file: '../model.onnx.data' is not a "
                                                                         "relative path inside the export dir"]),
    "path-absolute": (_set("weights.0.file", "/etc/passwd"), "fp", [".file: '/etc/passwd' is not a relative"]),
    "path-symlink-escape": (_symlink_out, "fp", [".file: 'link.data' leads outside the export dir"]),
    "files-model-absolute": (_set("files.model", "/etc/hostname"), "fp", ["files.model: '/etc/hostname' is not"]),
    "files-tokenizer-dotdot": (_set("files.tokenizer", "../../tok"), "fp", ["files.tokenizer: '../../tok'"]),
    "files-data-missing": (_set("files.data", "nope.data"), "fp", ["files.data: 'nope.data' is missing or not a "
                                                                   "regular file"]),
    "files-tokenizer-fifo": (_tokenizer_fifo, "fp", ["files.tokenizer: 'tokenizer.json' is missing or not a "
                                                     "regular file or directory"]),
    "tensor-not-in-graph": (_tensor_missing, "fp", [".tensor: 'no_such_initializer' is not in model.onnx"]),
    "fingerprint": (_set("fingerprint", "sha256:" + "0" * 64), "as-is", ["fingerprint: sha256:000", "re-export"]),
    "vocab-size-missing": (_delete("io.vocab_size"), "fp", ["io.vocab_size: missing"]),
    "vocab-size-zero": (_set("io.vocab_size", 0), "fp", ["io.vocab_size: 0 is not a positive integer"]),
    "eos-outside-vocab": (_set("io.eos_token_id", 512), "fp", ["io.eos_token_id: 512 is not a token id"]),
    "cache-heads-missing": (_delete("io.cache.num_heads"), "fp", ["io.cache.num_heads: missing"]),
    "opt-level-getattr": (_set("files.graph_optimization_level", "__class__"), "fp",
                          ["files.graph_optimization_level: '__class__' is not one of"]),
    "control-chars-escaped": (_control_chars_in_name, "fp", ["is also weights[0]", "\\x1b[2J\\x1b]0;pwned\\x07"]),
}


@pytest.fixture
def onnx_copy(tiny_exports, tmp_path):
    d = _copy(tiny_exports["onnx"], tmp_path / "export")
    return d, json.loads((d / "manifest.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_broken_manifest_is_one_manifest_error_naming_the_field(onnx_copy, case):
    d, m = onnx_copy
    edit, mode, words = CASES[case]
    edit(m, d)
    if mode != "raw":
        _write(d, m, refingerprint=mode == "fp")
    result: dict = {}
    reader = threading.Thread(target=lambda: result.update(r=_outcome(d)), daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "read_manifest blocked"
    error = result["r"]
    assert type(error) is ManifestError, repr(error)
    for word in words:
        assert word in str(error), (word, str(error))
    assert not any(ch in str(error) for ch in "\x1b\x07\r\u202e")


def _outcome(d: Path):
    try:
        read_manifest(d)
    except Exception as exc:   # noqa: BLE001 - the test asserts the exact type
        return exc
    return None


def test_disjoint_fused_slices_are_accepted(onnx_copy):
    d, m = onnx_copy
    _fused_slices(overlap=False)(m, d)
    _write(d, m)
    weights = read_manifest(d)["weights"]
    halves = [w for w in weights if w["tensor"] == weights[_patchable(m)[0]]["tensor"]]
    assert sorted(w["out_offset"] for w in halves) == [0, halves[0]["shape"][0]]


def test_the_real_exports_pass_and_stay_unchanged(tiny_exports):
    for d in tiny_exports.values():
        before = (d / "manifest.json").read_text()
        m = read_manifest(d)
        validate(copy.deepcopy(m), export_dir=d)
        assert json.loads(before) == m


def test_executorch_tensor_missing_from_the_ptd(tiny_exports, tmp_path):
    d = _copy(tiny_exports["executorch"], tmp_path / "export")
    m = json.loads((d / "manifest.json").read_text())
    m["weights"][_patchable(m)[0]]["tensor"] = "f" * 64
    _write(d, m)
    with pytest.raises(ManifestError, match=r"\.tensor: 'f{64}' is not in model\.ptd"):
        read_manifest(d)


@pytest.mark.parametrize("kernels", [["evil::op"], "llama::custom_sdpa", [["llama::custom_sdpa"]]],
                         ids=["unknown-kernel", "not-a-list", "nested"])
def test_executorch_kernels_outside_the_known_set_are_refused(tiny_exports, tmp_path, kernels):
    d = _copy(tiny_exports["executorch"], tmp_path / "export")
    m = json.loads((d / "manifest.json").read_text())
    m["io"]["cache"]["kernels"] = kernels
    _write(d, m)
    with pytest.raises(ManifestError, match=r"io\.cache\.kernels: .* is not a list of kernels this runtime can load"):
        read_manifest(d)
