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
      "io": {"inputs": [...], "outputs": [...], "cache": {...}},   # backend-specific, documented by the exporter
      "files": {...},                       # backend-specific: model file, data file, tokenizer dir, ...
      "export": {...}                       # free-form: versions, timings, parity figures
    }
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LAYOUTS = ("as_is", "transposed")
BACKENDS = ("onnxruntime", "executorch")


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


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    validate(manifest, where=str(Path(out_dir) / MANIFEST_NAME))
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: not found; is {export_dir} a directory written by `shira-edge export`?") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    validate(manifest, where=str(path))
    return manifest


def validate(manifest: dict[str, Any], where: str = MANIFEST_NAME) -> None:
    def need(obj, key, typ, ctx):
        if not isinstance(obj, dict) or key not in obj:
            raise ManifestError(f"{where}: missing key {ctx}{key!r}")
        if not isinstance(obj[key], typ):
            raise ManifestError(f"{where}: key {ctx}{key!r} should be {typ.__name__ if isinstance(typ, type) else typ}")
        return obj[key]

    version = need(manifest, "format_version", int, "")
    if version != FORMAT_VERSION:
        raise ManifestError(f"{where}: format_version {version} is not supported (this build reads {FORMAT_VERSION}); "
                            f"re-export with this version of shira-edge")
    backend = need(manifest, "backend", str, "")
    if backend not in BACKENDS:
        raise ManifestError(f"{where}: backend {backend!r} is not one of {BACKENDS}")
    need(manifest, "model", dict, "")
    need(manifest, "fingerprint", str, "")
    weights = need(manifest, "weights", list, "")
    for i, w in enumerate(weights):
        ctx = f"weights[{i}]."
        name = need(w, "name", str, ctx)
        shape = need(w, "shape", list, ctx)
        if len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ManifestError(f"{where}: {name}: shape {shape} is not [out, in]")
        if need(w, "layout", str, ctx) not in LAYOUTS:
            raise ManifestError(f"{where}: {name}: layout {w['layout']!r} is not one of {LAYOUTS}")
        for key in ("tensor", "file", "digest", "dtype"):
            need(w, key, str, ctx)
        for key in ("offset", "nbytes"):
            if need(w, key, int, ctx) < 0:
                raise ManifestError(f"{where}: {name}: {key} is negative")
        need(w, "patchable", bool, ctx)
