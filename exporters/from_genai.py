"""A manifest for a folder onnxruntime-genai's model builder wrote (`shira-edge export --from GENAI_DIR`).

    python -m onnxruntime_genai.models.builder -i HF_DIR -o GENAI_DIR -p fp32 -e cpu
    shira-edge export --from GENAI_DIR --model HF_DIR -o OUT

The builder's graph is kept as it is. What the runtime needs is where each PyTorch weight lives in it, and that is
found by content, never by name: every nn.Linear weight of the HF model is searched for in every float32 external
initializer, plain or transposed, whole or as a slice of the output axis (the builder fuses q/k/v into one
`attn.qkv_proj.MatMul.weight`, stored (in, q+k+v)). Each weight must be found exactly once and its bytes equal
byte for byte; the entry then records tensor_shape and out_offset for the slice. The graph is checked the way the
runtime runs it (the weights survive ORT's optimizer as MatMul initializers; logits match PyTorch).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import ExportError, apply_targets, tied_weights

CONFIG = "genai_config.json"
# The builder's fused GroupQueryAttention sums in another order than PyTorch: on SmolLM2-135M its fp32 logits differ
# by 2.1e-4 (measured here), so `export --from` checks parity at 1e-3 unless --atol says otherwise.
GENAI_ATOL = 1e-3


@dataclass
class Stored:
    """One float32 2-D initializer in the external data file."""

    name: str
    file: str
    offset: int
    array: np.ndarray   # (R, C) row-major view of the file's bytes, as uint32 so equality is byte equality


def export_from_genai(genai_dir, model, info, out_dir: Path, *, stages, atol: float = GENAI_ATOL, targets=None) -> dict:
    """Copy GENAI_DIR's files into out_dir and return the manifest for them (written by the caller). `targets`:
    PyTorch weight names to keep patchable, as for the other exporters (each must be found in the builder's graph)."""
    genai_dir = Path(genai_dir)
    decoder = read_genai_config(genai_dir)
    with stages("copy", f"{genai_dir} (onnxruntime-genai builder output)"):
        for path in genai_dir.iterdir():
            if path.is_file() and not path.is_symlink():
                shutil.copy2(path, out_dir / path.name)
    model_file = decoder["filename"]
    with stages("map", "find every Linear weight of the model in the builder's initializers, by content"):
        weights = weight_map(model, stored_tensors(out_dir, model_file))
        apply_targets(weights, targets, "ONNX (--from)")
    with stages("verify", "optimized graph keeps the weights; logits vs PyTorch"):
        from .onnx_verify import check_optimized_graph

        check_optimized_graph(out_dir / model_file, sorted({w["tensor"] for w in weights if w["patchable"]}))
        parity = genai_parity(out_dir / model_file, decoder, model, atol)
    return manifest(model, info, decoder, weights, parity, genai_dir)


def read_genai_config(genai_dir: Path) -> dict:
    path = genai_dir / CONFIG
    try:
        config = json.loads(path.read_text())
        decoder = config["model"]["decoder"]
        for key in ("filename", "num_hidden_layers", "num_key_value_heads", "head_size", "inputs", "outputs"):
            decoder[key]  # noqa: B018 - KeyError below names it
    except FileNotFoundError:
        raise ExportError(f"--from {genai_dir}: no {CONFIG}; pass a folder written by "
                          f"`python -m onnxruntime_genai.models.builder`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"--from {genai_dir}: {CONFIG} is not a builder config (model.decoder.{exc} missing or "
                          f"unreadable); rebuild the folder") from None
    return decoder


def stored_tensors(out_dir: Path, model_file: str) -> list[Stored]:
    """Every float32 2-D initializer kept in an external data file, as a read-only view of that file."""
    import onnx

    proto = onnx.load(str(out_dir / model_file), load_external_data=False)
    maps: dict[str, np.ndarray] = {}
    found = []
    for t in proto.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2 or "location" not in ext:
            continue
        file = ext["location"]
        if file not in maps:
            maps[file] = np.memmap(out_dir / file, dtype="<u4", mode="r")
        offset, (rows, cols) = int(ext.get("offset", 0)), (int(d) for d in t.dims)
        start = offset // 4
        found.append(Stored(t.name, file, offset, maps[file][start:start + rows * cols].reshape(rows, cols)))
    if not found:
        raise ExportError(f"{model_file}: no float32 weights in an external data file; build with `-p fp32` "
                          f"(the runtime patches float32 weights only)")
    return found


def find(weight: np.ndarray, tensors: list[Stored]) -> list[tuple[Stored, str, int]]:
    """Every (tensor, layout, out_offset) whose bytes equal `weight` (out, in): T[o:o+out, :] == W ("as_is") or
    T[:, o:o+out] == W.T ("transposed"). Candidates come from where W's first element appears."""
    out, inp = weight.shape
    hits = []
    for t in tensors:
        rows, cols = t.array.shape
        if cols == inp and rows >= out:
            for o in np.flatnonzero(t.array[: rows - out + 1, 0] == weight[0, 0]):
                if np.array_equal(t.array[o:o + out], weight):
                    hits.append((t, "as_is", int(o)))
        if rows == inp and cols >= out:
            for o in np.flatnonzero(t.array[0, : cols - out + 1] == weight[0, 0]):
                if np.array_equal(t.array[:, o:o + out], weight.T):
                    hits.append((t, "transposed", int(o)))
    return hits


def weight_map(model, tensors: list[Stored]) -> list[dict]:
    """Manifest entries for every nn.Linear weight; tied ones (lm_head) are listed but not patchable."""
    from torch import nn

    from shira_edge.runtime.fingerprint import weight_digest
    from shira_edge.runtime.manifest import weight_entry

    tied = tied_weights(model)   # name -> the weight it shares storage with (the one rule, exporters/common.py)
    entries = []
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        name = f"{module_name}.weight"
        w = module.weight.detach().float().numpy()
        hits = find(np.ascontiguousarray(w).view("<u4"), tensors)
        if len(hits) != 1:
            what = "nowhere" if not hits else f"{len(hits)} times ({', '.join(h[0].name for h in hits[:3])})"
            raise ExportError(f"{name} ({w.shape[0]}x{w.shape[1]}) is found {what} in the builder's float32 "
                              f"initializers; --model must be the exact model the folder was built from, with -p fp32")
        t, layout, out_offset = hits[0]
        owner = tied.get(name)
        entry = weight_entry(name, w.shape, t.name, layout, t.file, t.offset, w.size * 4, weight_digest(w),
                             patchable=owner is None, note=f"tied to {owner}; not patchable" if owner else None)
        if t.array.shape != (w.shape if layout == "as_is" else w.shape[::-1]):   # a slice of a fused tensor
            entry.update(nbytes=t.array.size * 4, tensor_shape=list(t.array.shape), out_offset=out_offset)
        entries.append(entry)
    return entries


def io_spec(decoder: dict, cfg) -> dict:
    """The builder's io as the manifest records it. The graph derives positions from attention_mask (there is no
    position_ids input) and caches GQA keys/values per layer as [batch, kv_heads, past_len, head_size]."""
    from .architecture import token_ids

    layers, names = decoder["num_hidden_layers"], decoder["inputs"]
    outs = decoder["outputs"]
    past = [names[k] % i for i in range(layers) for k in ("past_key_names", "past_value_names")]
    present = [outs[k] % i for i in range(layers) for k in ("present_key_names", "present_value_names")]
    return {
        "inputs": [names["input_ids"], names["attention_mask"], *past],
        "outputs": [outs["logits"], *present],
        "dtypes": {"input_ids": "int64", "attention_mask": "int64", "past": "float32", "logits": "float32"},
        "cache": {"kind": "past_present", "num_layers": layers, "num_heads": decoder["num_key_value_heads"],
                  "num_attention_heads": decoder.get("num_attention_heads"), "head_dim": decoder["head_size"],
                  "max_seq_len": cfg.max_position_embeddings, "layout": "[batch, num_heads, past_len, head_dim]",
                  "initial_past_len": 0, "past": past, "present": present},
        "position_ids": "derived in the graph from attention_mask (no position_ids input)",
        "max_positions": cfg.max_position_embeddings,
        **token_ids(cfg),
    }


def genai_parity(model_path: Path, decoder: dict, hf_model, atol: float) -> dict:
    """Prefill 3 tokens, then decode one at a time, through ORT with the runtime's session options, vs PyTorch."""
    import onnxruntime as ort
    import torch

    from .onnx_verify import PREFILL, session_options

    cfg = hf_model.config
    io = io_spec(decoder, cfg)
    sess = ort.InferenceSession(str(model_path), session_options(), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(4, cfg.vocab_size, size=(1, 10), dtype=np.int64)
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids)).logits.numpy()
    shape = (1, io["cache"]["num_heads"], 0, io["cache"]["head_dim"])
    past = [np.zeros(shape, np.float32) for _ in io["cache"]["past"]]
    steps = []
    for start, stop in [(0, PREFILL)] + [(t, t + 1) for t in range(PREFILL, ids.shape[1])]:
        feeds = {io["inputs"][0]: ids[:, start:stop], io["inputs"][1]: np.ones((1, stop), np.int64),
                 **dict(zip(io["cache"]["past"], past))}
        logits, *past = sess.run(io["outputs"], feeds)
        steps.append(logits)
    diff = float(np.abs(np.concatenate(steps, axis=1) - expected).max())
    if not diff <= atol:
        raise ExportError(f"parity check failed: max_abs_diff_decode = {diff:.3g} > {atol:g} (the builder's graph "
                          f"vs PyTorch); is --model the model the folder was built from? (or raise --atol)")
    return {"prompt": "batch 1 x 10 tokens (seed 0)", "max_abs_diff_decode": diff,
            "decode": f"prefill {PREFILL} then 1 token per step with the KV cache", "atol": atol}


def manifest(model, info, decoder: dict, weights: list[dict], parity: dict, genai_dir: Path) -> dict:
    import onnxruntime

    from shira_edge.runtime.fingerprint import base_fingerprint

    from .onnx_verify import OPT_LEVEL, SESSION_CONFIG

    data_files = sorted({w["file"] for w in weights})
    try:
        from importlib.metadata import version

        builder = f"onnxruntime-genai {version('onnxruntime-genai')}"
    except Exception:  # noqa: BLE001 - the folder may come from another machine
        builder = "onnxruntime-genai (version unknown here)"
    return {
        "format_version": 1,
        "backend": "onnxruntime",
        "model": info.to_json(),
        "fingerprint": base_fingerprint({w["name"]: (w["shape"], w["digest"]) for w in weights}),
        "weights": weights,
        "io": io_spec(decoder, model.config),
        "files": {"model": decoder["filename"], "data": data_files[0], "genai_config": CONFIG,
                  "graph_optimization_level": OPT_LEVEL, "session_config": dict(SESSION_CONFIG)},
        "export": {"exporter": "shira-edge export --from (onnxruntime-genai builder output)",
                   "graph_built_by": builder, "from_dir": genai_dir.name,
                   "onnxruntime": onnxruntime.__version__, "parity": parity},
    }
