"""manifest.json: the contract between an exporter (which writes it with `write_manifest`) and the on-device runtime
(which reads it with `read_manifest`). It lives in runtime/ because the device reads it; json and checks only.

An exporter writes one manifest beside the model. The runtime trusts nothing else about the exported weights: it
finds every adaptable weight's bytes through `weights[*].file/offset/nbytes` and maps (row, col) of the PyTorch
(out, in) weight into the backend buffer through `layout`.

Schema (format_version 1):

    {
      "format_version": 1,
      "backend": "onnxruntime" | "executorch",
      "model": {"name", "source", "architecture", "weights": "pretrained"|"random-init", "seed"},
      "fingerprint": "sha256:...",          # runtime.fingerprint.base_fingerprint over all `weights`
      "weights": [                          # one entry per adaptable nn.Linear weight
        {"name": "model.decoder.layers.0.self_attn.q_proj.weight",   # PyTorch state_dict name
         "shape": [out, in],                                         # PyTorch layout
         "tensor": "...",                   # ONNX initializer name or ExecuTorch named-data key
         "layout": "as_is" | "transposed",  # as_is: buffer is (out, in) row-major; transposed: (in, out) row-major
         "dtype": "float32",
         "file": "model.onnx.data",         # relative to the export dir
         "offset": 0, "nbytes": 0,          # where the tensor's bytes are in `file`
         "digest": "...",                   # runtime.fingerprint.weight_digest of the PyTorch weight
         "patchable": true,                 # false: e.g. tied lm_head; the runtime refuses adapters that target it
         "note": null}                      # e.g. "tied to model.decoder.embed_tokens.weight"
      ],
      "io": {"vocab_size": V, "cache": {...}, ...},   # backend-specific, documented by the exporter
      "files": {...},                       # backend-specific: model file, data file, tokenizer dir, ...
      "export": {...}                       # free-form: versions, timings, parity figures
    }

Optional weight keys (the weight map extension; format_version stays 1): "tensor_shape" [R, C] of the backend tensor
as stored (default `shape`, reversed for "transposed"), "out_offset" (where this weight's output rows start in a
fused tensor; default 0) and "row_perm" (null or a permutation of range(out)). Several entries may share one tensor
only with disjoint output ranges.

`read_manifest` is the one trust boundary for an export directory (docs/runtime.md, "Trust model"): every field
is checked here, with the files it names, and anything wrong raises one ManifestError naming the field. Backends
may assume what `validate` checks and nothing more.

    >>> validate({"format_version": 1, "backend": "tflite"})      # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ManifestError: manifest.json: backend: 'tflite' is not one of ('onnxruntime', 'executorch')
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .fingerprint import base_fingerprint
from .untrusted import printable, read_regular

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LAYOUTS = ("as_is", "transposed")
BACKENDS = ("onnxruntime", "executorch")
DTYPES = {"float32": 4}           # what the runtime can patch; anything else is refused, never reinterpreted
MAX_MANIFEST_BYTES = 64 << 20     # a manifest for thousands of weights is a few MB
MAX_WEIGHTS = 1 << 16
MAX_DIM = 1 << 31                 # one axis of one weight; sizes are further bounded by the file they live in
OPT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
PATH_KEYS = {"onnxruntime": {"model": "model.onnx", "data": None}, "executorch": {"program": "model.pte",
                                                                                  "data": "model.ptd"}}
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}\Z")


class ManifestError(ValueError):
    """manifest.json is missing, unreadable or does not follow the schema; the message names the key."""


def weight_entry(name: str, shape, tensor: str, layout: str, file: str, offset: int, nbytes: int, digest: str,
                 dtype: str = "float32", patchable: bool = True, note: str | None = None) -> dict[str, Any]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out, inp = (int(d) for d in shape)
    if nbytes != out * inp * 4:
        raise ValueError(f"{name}: nbytes {nbytes} != {out}*{inp}*4 for float32")
    return {"name": name, "shape": [out, inp], "tensor": tensor, "layout": layout, "dtype": dtype, "file": file,
            "offset": int(offset), "nbytes": int(nbytes), "digest": digest, "patchable": bool(patchable),
            "note": note}


def tensor_shape(entry: dict[str, Any]) -> tuple[int, int]:
    """[R, C] of the backend tensor that holds a (validated) weight entry, row-major as stored."""
    if entry.get("tensor_shape") is not None:
        return tuple(entry["tensor_shape"])
    out, inp = entry["shape"]
    return (out, inp) if entry["layout"] == "as_is" else (inp, out)


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Validate (the files it names included: they are written first) and write atomically."""
    validate(manifest, where=str(Path(out_dir) / MANIFEST_NAME), export_dir=out_dir)
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """manifest.json of `export_dir`, parsed and validated together with the files it names."""
    path = Path(export_dir) / MANIFEST_NAME
    where = printable(path)
    try:
        raw = read_regular(path, "manifest", limit=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ManifestError(f"{where}: not found; is {printable(export_dir)} a directory written by "
                            f"`shira-edge export`?") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{where}: cannot read it: {printable(getattr(exc, 'strerror', None) or exc)}") from None
    manifest = parse_manifest(raw, where)
    validate(manifest, where=where, export_dir=export_dir)
    return manifest


def parse_manifest(raw: bytes, where: str = MANIFEST_NAME) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, bounded nesting."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{where}: not UTF-8 (byte {exc.start}); re-export it") from None
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ManifestError(f"{where}: JSON nested too deeply; re-export it") from None
    except ValueError as exc:   # JSONDecodeError, duplicate keys, NaN, integers of absurd length
        raise ManifestError(f"{where}: not valid JSON ({printable(str(exc)[:200])}); re-export it") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"key {key!r} appears twice in one object")
        obj[key] = value
    return obj


# ---------------------------------------------------------------- validation


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, what: str):
        raise ManifestError(f"{self.where}: {field}: {what}")

    def get(self, obj: dict, key: str, field: str, test: Callable[[Any], bool], what: str, default=...):
        if key not in obj:
            if default is not ...:
                return default
            self.fail(field, "missing")
        value = obj[key]
        if not test(value):
            self.fail(field, f"{_short(value)} is not {what}")
        return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(x: Any, limit: int = 120) -> str:
    text = repr(x)   # repr escapes every non-printable character, as printable() does
    return text if len(text) <= limit else text[:limit] + "..."


def _nonneg(x) -> bool:
    return _is_int(x) and 0 <= x < 1 << 62


def _name(x) -> bool:
    return isinstance(x, str) and 0 < len(x) <= 4096


def _dims(x) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(_is_int(d) and 1 <= d <= MAX_DIM for d in x)


def validate(manifest: Any, where: str = MANIFEST_NAME, export_dir: str | Path | None = None) -> None:
    """Check every field; with `export_dir`, also the files it names (confined, regular, large enough) and, where
    a file tells cheaply, that the graph holds each weight's tensor. Raises ManifestError naming the field."""
    c = _Checker(where)
    if not isinstance(manifest, dict):
        c.fail("top level", "must be a JSON object")
    version = c.get(manifest, "format_version", "format_version", _is_int, "an integer")
    if version != FORMAT_VERSION:
        c.fail("format_version", f"{version} is not supported (this build reads {FORMAT_VERSION}); re-export with "
                                 f"this version of shira-edge")
    backend = c.get(manifest, "backend", "backend", lambda b: b in BACKENDS, f"one of {BACKENDS}")
    model = c.get(manifest, "model", "model", lambda m: isinstance(m, dict), "an object")
    for key in ("name", "source", "architecture", "weights"):
        c.get(model, key, f"model.{key}", lambda v: v is None or isinstance(v, str), "a string", default=None)
    c.get(model, "seed", "model.seed", lambda v: v is None or _is_int(v), "an integer", default=None)
    fingerprint = c.get(manifest, "fingerprint", "fingerprint", lambda f: isinstance(f, str) and bool(
        _FINGERPRINT.match(f)), '"sha256:<64 hex digits>"')
    weights = c.get(manifest, "weights", "weights", lambda w: isinstance(w, list) and 0 < len(w) <= MAX_WEIGHTS,
                    f"a list of 1..{MAX_WEIGHTS} weight entries")
    for i, w in enumerate(weights):
        _check_weight(c, i, w)
    io = c.get(manifest, "io", "io", lambda v: isinstance(v, dict), "an object")
    _check_io(c, backend, io)
    files = c.get(manifest, "files", "files", lambda v: isinstance(v, dict), "an object", default={})
    _check_files(c, backend, files)
    c.get(manifest, "export", "export", lambda v: isinstance(v, dict), "an object", default={})
    if export_dir is not None:   # first: a weight beyond its file is reported as that, not as an overlap
        _check_on_disk(c, backend, weights, files, Path(export_dir))
    _check_unique_and_disjoint(c, weights)
    expected = base_fingerprint({w["name"]: (w["shape"], w["digest"]) for w in weights})
    if fingerprint != expected:
        c.fail("fingerprint", f"{fingerprint} does not match the weights' shapes and digests ({expected}); the "
                              f"manifest was edited or corrupted, re-export it")


def _check_weight(c: _Checker, i: int, w: Any) -> None:
    at = f"weights[{i}]"
    if not isinstance(w, dict):
        c.fail(at, "must be an object")
    name = c.get(w, "name", f"{at}.name", _name, "a non-empty string")
    at = f"weights[{i}] ({_short(name)})"
    out, inp = c.get(w, "shape", f"{at}.shape", _dims, "[out, in] with positive integers")
    c.get(w, "tensor", f"{at}.tensor", _name, "a non-empty string")
    layout = c.get(w, "layout", f"{at}.layout", lambda v: v in LAYOUTS, f"one of {LAYOUTS}")
    dtype = c.get(w, "dtype", f"{at}.dtype", lambda v: isinstance(v, str), "a string")
    if dtype not in DTYPES:
        c.fail(f"{at}.dtype", f"{_short(dtype)} is not supported: this runtime patches {', '.join(DTYPES)} weights "
                              f"only (it never reads one dtype as another); re-export in float32")
    c.get(w, "file", f"{at}.file", _name, "a non-empty string")
    offset = c.get(w, "offset", f"{at}.offset", _nonneg, "a non-negative integer")
    nbytes = c.get(w, "nbytes", f"{at}.nbytes", _nonneg, "a non-negative integer")
    if offset % DTYPES[dtype]:
        c.fail(f"{at}.offset", f"{offset} is not a multiple of the {dtype} size {DTYPES[dtype]}")
    c.get(w, "digest", f"{at}.digest", lambda v: isinstance(v, str) and bool(_HEX64.match(v)),
          "64 lowercase hex digits")
    c.get(w, "patchable", f"{at}.patchable", lambda v: isinstance(v, bool), "true or false")
    c.get(w, "note", f"{at}.note", lambda v: v is None or isinstance(v, str), "a string or null", default=None)

    rows, cols = c.get(w, "tensor_shape", f"{at}.tensor_shape", lambda v: v is None or _dims(v),
                       "[R, C] with positive integers", default=None) or \
        ((out, inp) if layout == "as_is" else (inp, out))
    if nbytes != rows * cols * DTYPES[dtype]:
        c.fail(f"{at}.nbytes", f"{nbytes} does not hold a {rows}x{cols} {dtype} tensor "
                               f"({rows * cols * DTYPES[dtype]} bytes)")
    out_axis, in_axis = (rows, cols) if layout == "as_is" else (cols, rows)
    if in_axis != inp:
        c.fail(f"{at}.tensor_shape", f"{rows}x{cols} ({layout}) has {in_axis} inputs, the weight has {inp}")
    out_offset = c.get(w, "out_offset", f"{at}.out_offset", _nonneg, "a non-negative integer", default=0)
    if out_offset + out > out_axis:
        c.fail(f"{at}.out_offset", f"rows {out_offset}..{out_offset + out} do not fit in the tensor's {out_axis} "
                                   f"outputs")
    perm = c.get(w, "row_perm", f"{at}.row_perm", lambda v: v is None or isinstance(v, list), "a list or null",
                 default=None)
    if perm is not None and (len(perm) != out or not all(_is_int(r) for r in perm)
                             or sorted(perm) != list(range(out))):
        c.fail(f"{at}.row_perm", f"must be a permutation of range({out}) (one entry per output row)")


def _check_unique_and_disjoint(c: _Checker, weights: list[dict]) -> None:
    """Names are unique; a patchable weight shares bytes with no other entry, except a disjoint output slice of
    the same tensor (a fused qkv/gate_up). Tied, unpatchable entries may alias: nothing writes them."""
    seen: dict[str, int] = {}
    for i, w in enumerate(weights):
        if w["name"] in seen:
            c.fail(f"weights[{i}].name", f"{_short(w['name'])} is also weights[{seen[w['name']]}]; each weight "
                                         f"appears once")
        seen[w["name"]] = i
    by_tensor: dict[str, int] = {}
    for i, w in enumerate(weights):
        first = by_tensor.setdefault(w["tensor"], i)
        f = weights[first]
        if first != i and any(f.get(k) != w.get(k) for k in ("file", "offset", "nbytes", "layout")) \
                or first != i and tensor_shape(f) != tensor_shape(w):
            c.fail(f"weights[{i}].tensor", f"{_short(w['tensor'])} is also weights[{first}] but at another "
                                           f"place, layout or shape")
    # One span per tensor (its entries agree on the bytes, checked above), patchable if any entry is. Sweeping by
    # start with the furthest end so far, of all spans and of patchable ones, finds an overlap that involves a
    # patchable span whenever there is one.
    spans = sorted((w["file"], w["offset"], w["offset"] + w["nbytes"], any(weights[j]["patchable"] for j in group), i)
                   for i, w, group in ((by_tensor[t], weights[by_tensor[t]], members)
                                       for t, members in _groups(weights).items()))
    reach_all = reach_patch = None   # (file, end, index)
    for file, start, end, patchable, i in spans:
        for reach, needs in ((reach_all, patchable), (reach_patch, True)):
            if needs and reach is not None and reach[0] == file and start < reach[1]:
                j = reach[2]
                c.fail(f"weights[{i}].offset", f"bytes {start}..{end} of {_short(file)} overlap weights[{j}] "
                                               f"({_short(weights[j]['name'])}); a patch would change both")
        if reach_all is None or reach_all[0] != file or end > reach_all[1]:
            reach_all = (file, end, i)
        if patchable and (reach_patch is None or reach_patch[0] != file or end > reach_patch[1]):
            reach_patch = (file, end, i)
    # Entries on one tensor: their output ranges must be disjoint.
    for members in _groups(weights).values():
        if len(members) < 2 or not any(weights[i]["patchable"] for i in members):
            continue
        ranges = sorted((weights[i].get("out_offset", 0), weights[i].get("out_offset", 0) + weights[i]["shape"][0],
                         i) for i in members)
        for (s0, e0, i0), (s1, e1, i1) in zip(ranges, ranges[1:]):
            if s1 < e0:
                c.fail(f"weights[{i1}].out_offset", f"output rows {s1}..{e1} of tensor "
                                                    f"{_short(weights[i1]['tensor'])} overlap weights[{i0}] "
                                                    f"({_short(weights[i0]['name'])}) rows {s0}..{e0}")


def _groups(weights: list[dict]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault(w["tensor"], []).append(i)
    return groups


def _token_id(vocab):
    one = lambda v: _is_int(v) and (vocab is None or 0 <= v < vocab)   # noqa: E731
    return lambda v: v is None or one(v) or (isinstance(v, list) and 0 < len(v) <= 64 and all(map(one, v)))


def _check_io(c: _Checker, backend: str, io: dict) -> None:
    vocab = c.get(io, "vocab_size", "io.vocab_size", lambda v: _is_int(v) and 1 <= v <= MAX_DIM,
                  "a positive integer")   # every exporter writes it; the runtime refuses token ids against it
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        c.get(io, key, f"io.{key}", _token_id(vocab), f"a token id (or list of ids) below io.vocab_size {vocab}", default=None)
    cache = c.get(io, "cache", "io.cache", lambda v: isinstance(v, dict), "an object")
    positive = (lambda v: _is_int(v) and 1 <= v <= MAX_DIM, "a positive integer")
    maybe_positive = (lambda v: v is None or positive[0](v), "a positive integer")
    c.get(io, "max_positions", "io.max_positions", *maybe_positive, default=None)
    c.get(cache, "max_seq_len", "io.cache.max_seq_len", *maybe_positive, default=None)
    for key in ("inputs", "outputs"):
        c.get(io, key, f"io.{key}", lambda v: isinstance(v, list) and len(v) <= MAX_WEIGHTS, "a list", default=[])
    if backend == "onnxruntime":
        for key in ("num_heads", "head_dim"):
            c.get(cache, key, f"io.cache.{key}", *positive)
        names = (lambda v: isinstance(v, list) and len(v) <= MAX_WEIGHTS and all(_name(n) for n in v),
                 "a list of names")
        past = c.get(cache, "past", "io.cache.past", *names)
        present = c.get(cache, "present", "io.cache.present", *names)
        if len(past) != len(present):
            c.fail("io.cache.present", f"{len(present)} names for {len(past)} io.cache.past inputs")
    else:
        from .et_compat import LLM_KERNELS

        c.get(cache, "max_seq_len", "io.cache.max_seq_len", *positive)
        known = lambda v: isinstance(v, list) and all(isinstance(k, str) and k in LLM_KERNELS for k in v)  # noqa: E731
        c.get(cache, "kernels", "io.cache.kernels", known,
              f"a list of kernels this runtime can load ({', '.join(LLM_KERNELS)}); re-export with this shira-edge",
              default=[])


def _check_files(c: _Checker, backend: str, files: dict) -> None:
    for key, value in files.items():
        if key == "graph_optimization_level":
            c.get(files, key, f"files.{key}", lambda v: v in OPT_LEVELS, f"one of {OPT_LEVELS}")
        elif key == "session_config":
            c.get(files, key, f"files.{key}", lambda v: isinstance(v, dict) and all(
                isinstance(k, str) and isinstance(x, (str, int, float)) and not isinstance(x, bool)
                for k, x in v.items()), "an object of string/number values")
        elif isinstance(value, str) or key in PATH_KEYS[backend] or key == "tokenizer":
            c.get(files, key, f"files.{key}", lambda v: v is None and key not in PATH_KEYS[backend] or _name(v),
                  "a relative path")
        elif not (value is None or _is_int(value) or isinstance(value, (bool, float))):
            c.fail(f"files.{key}", f"{_short(value)} is not a path, number or null")


# ---------------------------------------------------------------- the files the manifest names


def confined(export_dir: Path, rel: str, field: str, where: str = MANIFEST_NAME) -> Path:
    """`export_dir / rel`, refused unless it stays inside export_dir (no absolute path, no .., no symlink out)."""
    c = _Checker(where)
    parts = rel.replace("\\", "/").split("/")
    if "\0" in rel or os.path.isabs(rel) or rel.startswith("\\") or ".." in parts or (len(rel) > 1 and rel[1] == ":"):
        c.fail(field, f"{_short(rel)} is not a relative path inside the export dir")
    root = os.path.realpath(export_dir)
    real = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, real]) != root:
        c.fail(field, f"{_short(rel)} leads outside the export dir (a symlink?)")
    return Path(real)


def _check_on_disk(c: _Checker, backend: str, weights: list[dict], files: dict, export_dir: Path) -> None:
    paths = {}
    for key, default in PATH_KEYS[backend].items():
        rel = files.get(key, default)
        if rel is not None:
            paths[key] = _regular(c, confined(export_dir, rel, f"files.{key}", c.where), f"files.{key}")
    for key, value in files.items():
        if isinstance(value, str) and key not in paths and key not in ("graph_optimization_level",):
            path = confined(export_dir, value, f"files.{key}", c.where)
            if not (path.is_file() or path.is_dir()):   # a FIFO would block whoever opens it
                c.fail(f"files.{key}", f"{_short(value)} is missing or not a regular file or directory in the "
                                       f"export dir")
    sizes: dict[str, int] = {}
    for i, w in enumerate(weights):
        field = f"weights[{i}] ({_short(w['name'])}).file"
        if w["file"] not in sizes:
            sizes[w["file"]] = _regular(c, confined(export_dir, w["file"], field, c.where), field).stat().st_size
        if w["offset"] + w["nbytes"] > sizes[w["file"]]:
            c.fail(f"weights[{i}] ({_short(w['name'])}).offset", f"bytes {w['offset']}..{w['offset'] + w['nbytes']} "
                                                              f"lie beyond the end of {_short(w['file'])} "
                                                              f"({sizes[w['file']]} bytes); truncated? re-export")
    graph = paths.get("model") if backend == "onnxruntime" else paths.get("data")
    if graph is not None:
        missing = tensors_missing(graph, [w["tensor"] for w in weights], backend)
        if missing:
            i = next(i for i, w in enumerate(weights) if w["tensor"] == missing[0])
            c.fail(f"weights[{i}] ({_short(weights[i]['name'])}).tensor",
                   f"{_short(missing[0])} is not in {graph.name} ({len(missing)} tensor(s) missing); a patch would "
                   f"change nothing the graph reads")


def _regular(c: _Checker, path: Path, field: str) -> Path:
    if not path.is_file():   # after realpath: a FIFO, device or directory is not a weight file
        c.fail(field, f"{_short(path.name)} is missing or not a regular file in the export dir")
    return path


def tensors_missing(graph_file: Path, names: list[str], backend: str) -> list[str]:
    """Names the graph file does not hold, by a cheap search for each name as the file format stores it: an ONNX
    TensorProto name (field 8, length-delimited) in model.onnx, a flatbuffer string (u32 length, bytes, NUL) in the
    key table of an ExecuTorch .ptd. [] when the format is not recognised (the check is then skipped)."""
    with open(graph_file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return list(dict.fromkeys(names))
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if backend == "onnxruntime":
                return [n for n in dict.fromkeys(names) if mm.find(b"\x42" + _varint(len(n.encode())) + n.encode())
                        < 0]
            # FlatTensor: "FH01" extended header at byte 8; the key table ends where the data segment begins.
            if size < 40 or mm[8:12] != b"FH01":
                return []
            end = min(struct.unpack_from("<Q", mm, 32)[0], size)
            return [n for n in dict.fromkeys(names)
                    if mm.find(struct.pack("<I", len(n.encode())) + n.encode() + b"\0", 0, end) < 0]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)
