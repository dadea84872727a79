"""Export a causal LM (any architecture `architecture.describe` knows) to ONNX (graph + aligned external weight data) and build its manifest.

    >>> from shira_edge.models import load_model
    >>> from shira_edge.exporters.common import Stages
    >>> model, info = load_model("tiny-opt")
    >>> import tempfile; out = tempfile.mkdtemp()
    >>> manifest = export_onnx(model, info, out, stages=Stages(quiet=True))
    >>> manifest["export"]["parity"]["max_abs_diff_full"] < 1e-4
    True

Steps: trace `PastPresentDecoder` (kv_cache.py) with `torch.export` (dynamic batch, sequence, past length), lower it to ONNX, recover
which initializer holds each Linear weight from the MatMul nodes' `pkg.torch.onnx.name_scopes` and check its values
against PyTorch, write every large tensor to `model.onnx.data` at a 4096-byte aligned offset, read the offsets back
from the saved graph, then verify in ONNX Runtime (onnx_verify.py). The caller writes manifest.json.
"""

from __future__ import annotations

import ast
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data

from .architecture import cache_spec, check_max_seq_len, describe, token_ids
from .common import ExportError, apply_targets, manifest_head, tied_weights, usual_permissions
from .kv_cache import PastPresentDecoder
from ..runtime.fingerprint import weight_digest
from . import onnx_verify

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
ALIGN = 4096            # page size: each tensor can be mmapped or np.fromfile'd into its own aligned buffer
EXTERNAL_MIN_BYTES = 1024  # smaller constants (shapes, axes) stay inline: ORT's shape inference must read them
OPSET = 18


def export_onnx(model, info, out_dir, *, stages, atol: float = 1e-4, max_seq_len: int | None = None,
                targets=None, fuse_qkv: bool = False) -> dict:
    """Write model.onnx + model.onnx.data into out_dir, verify them, and return the manifest dict.

    `max_seq_len` (default: the model's max_position_embeddings) is recorded as the longest sequence the runtime
    may run; `targets`: PyTorch weight names to keep patchable (the others are marked not); `fuse_qkv`: one MatMul
    per layer for q/k/v (each weight is then a slice of `...qkv_proj.weight_t`: tensor_shape + out_offset)."""
    arch = describe(model)
    max_seq_len = check_max_seq_len(arch, max_seq_len, default=arch.max_positions)
    out_dir = Path(out_dir)
    wrapper = PastPresentDecoder(model, arch, fuse_qkv=fuse_qkv).eval()
    input_names, output_names = wrapper.io_names()
    with stages("trace", "torch.export, dynamic batch / sequence / past length"):
        program = _trace(wrapper)
    with stages("lower", "ExportedProgram -> ONNX; map and check every Linear weight"):
        proto = torch.onnx.export(program, dynamo=True, input_names=input_names, output_names=output_names,
                                  opset_version=OPSET, optimize=True, verbose=False).model_proto
        mapping = locate_onnx_weights(proto, model, wrapper.fused)
    tied = tied_weights(model)
    with stages("write", f"{MODEL_FILE} + {DATA_FILE} ({ALIGN}-byte aligned)"):
        save_aligned(proto, out_dir, keep_external={m[0] for m in mapping.values()} | set(tied.values()))
        weights = weight_entries(out_dir, model, mapping, tied)
        apply_targets(weights, targets, "ONNX")
    with stages("verify", "ONNX Runtime: optimized graph keeps the weights; logits and KV-cache decode vs PyTorch"):
        onnx_verify.check_optimized_graph(out_dir / MODEL_FILE, [w["tensor"] for w in weights if w["patchable"]])
        parity = onnx_verify.onnx_parity(out_dir, model, weights, atol=atol)
    manifest = _manifest(model, info, wrapper, weights, parity, max_seq_len)
    manifest["export"]["fused"] = ["qkv"] if fuse_qkv else []
    return manifest


def _trace(wrapper: PastPresentDecoder) -> torch.export.ExportedProgram:
    from torch.export import Dim

    # Sizes >= 2 everywhere: torch.export specializes dims that are 0 or 1 in the example. P = 0 still runs.
    batch, seq, past_len, total = 2, 4, 3, 7
    batch_d, seq_d, past_d, total_d = Dim("batch"), Dim("seq"), Dim("past_len", min=0), Dim("total")
    arch = wrapper.arch
    past = [torch.zeros(batch, arch.num_kv_heads, past_len, arch.head_dim) for _ in range(2 * arch.num_layers)]
    args = (torch.full((batch, seq), 4), torch.ones(batch, total, dtype=torch.long),
            torch.arange(past_len, total).repeat(batch, 1), *past)
    # forward(input_ids, attention_mask, position_ids, *past): torch.export sees *past as one tuple argument
    shapes = ({0: batch_d, 1: seq_d}, {0: batch_d, 1: total_d}, {0: batch_d, 1: seq_d},
              tuple({0: batch_d, 2: past_d} for _ in past))
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, args, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # torch.export errors are long; the first line says which guard failed
        raise ExportError(f"torch.export failed on the {arch.model_type} export module: {str(exc).strip().splitlines()[0]}") from exc


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return ast.literal_eval(prop.value)
    return []


def adaptable_linears(hf_model) -> dict[str, torch.nn.Linear]:
    """HF module path -> nn.Linear for every Linear the export keeps patchable (all but a tied lm_head)."""
    tied = tied_weights(hf_model)
    return {name: mod for name, mod in hf_model.named_modules()
            if isinstance(mod, torch.nn.Linear) and f"{name}.weight" not in tied}


def locate_onnx_weights(proto: onnx.ModelProto, model, fused=None) -> dict[str, tuple[str, str, int]]:
    """PyTorch weight name -> (initializer name, layout, out_offset), recovered from the graph and checked value by
    value.

    For each Linear, the one MatMul (or Gemm) that ran inside its module scope (for a fused Linear, the scope of the
    fused module, `fused[path] = (fused path, out_offset)`) must read an initializer that is used by nothing else and
    holds W.T (MatMul, Gemm without transB) or W (Gemm with transB=1) exactly, at out_offset along its outputs.
    """
    fused = fused or {}
    inits = {t.name: t for t in proto.graph.initializer}
    consumers = defaultdict(list)
    for node in proto.graph.node:
        for name in node.input:
            consumers[name].append(node)
    mapping = {}
    for path, linear in adaptable_linears(model).items():
        scope, out_offset = fused.get(path, (path, 0))
        hits = [n for n in proto.graph.node
                if n.op_type in ("MatMul", "Gemm") and scope in _scopes(n) and n.input[1] in inits]
        if len(hits) != 1:
            raise ExportError(f"{path}: expected one MatMul/Gemm reading a weight initializer in module scope "
                              f"{scope}, found {[n.name for n in hits]}; the ONNX graph layout changed")
        node, tensor = hits[0], hits[0].input[1]
        if len(consumers[tensor]) != 1:
            raise ExportError(f"{path}: initializer {tensor} is shared by {len(consumers[tensor])} nodes; "
                              f"patching it would change more than {path}")
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        layout = "as_is" if node.op_type == "Gemm" and trans_b else "transposed"
        weight = linear.weight.detach().numpy()
        if not np.array_equal(output_slice(numpy_helper.to_array(inits[tensor]), layout, out_offset, len(weight)),
                              weight):
            raise ExportError(f"{path}: initializer {tensor} does not hold the PyTorch weight ({layout}, "
                              f"out_offset {out_offset})")
        mapping[f"{path}.weight"] = (tensor, layout, out_offset)
    return mapping


def output_slice(tensor: np.ndarray, layout: str, out_offset: int, rows: int) -> np.ndarray:
    """The PyTorch (out, in) weight held in a backend tensor at output rows out_offset..out_offset+rows."""
    return tensor[out_offset:out_offset + rows] if layout == "as_is" else tensor[:, out_offset:out_offset + rows].T


def save_aligned(proto: onnx.ModelProto, out_dir: Path, keep_external: set[str]) -> None:
    """Save the graph with large tensors (and every name in keep_external) in DATA_FILE at ALIGN-ed offsets."""
    offset = 0
    for tensor in proto.graph.initializer:
        if tensor.name not in keep_external and len(tensor.raw_data) < EXTERNAL_MIN_BYTES:
            continue
        offset = -(-offset // ALIGN) * ALIGN
        # onnx's writer pads up to a preset offset (and checks it), in initializer order.
        set_external_data(tensor, DATA_FILE, offset=offset)
        offset += len(tensor.raw_data)
    onnx.save_model(proto, out_dir / MODEL_FILE)
    usual_permissions(out_dir / DATA_FILE)  # onnx creates it 0600; it ships with the model


def weight_entries(out_dir: Path, model, mapping: dict[str, tuple[str, str, int]], tied: dict[str, str]) -> list[dict]:
    """Manifest entries with file/offset/nbytes read back from the saved graph; the bytes there must equal W."""
    from shira_edge.runtime.manifest import weight_entry

    saved = onnx.load(str(out_dir / MODEL_FILE), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data} for t in saved.graph.initializer}
    dims = {t.name: list(t.dims) for t in saved.graph.initializer}
    params = dict(model.named_parameters(remove_duplicate=False))
    data = np.memmap(out_dir / DATA_FILE, dtype=np.uint8, mode="r")   # mapped once: a fused qkv tensor backs 3 entries
    todo = [(name, tensor, layout, out_offset, True, None) for name, (tensor, layout, out_offset) in mapping.items()]
    todo += [(name, owner, "as_is", 0, False, f"tied to {owner}; not patchable") for name, owner in tied.items()]
    entries = []
    for name, tensor, layout, out_offset, patchable, note in todo:
        ext = where.get(tensor, {})
        if ext.get("location") != DATA_FILE:
            raise ExportError(f"{name}: initializer {tensor} is not in {DATA_FILE}")
        offset, nbytes = int(ext["offset"]), int(ext["length"])
        weight = params[name].detach().numpy()
        stored = data[offset:offset + nbytes].view("<f4").reshape(dims[tensor])
        if offset % ALIGN or not np.array_equal(output_slice(stored, layout, out_offset, len(weight)), weight):
            raise ExportError(f"{name}: bytes at {DATA_FILE}:{offset} are misaligned or differ from the weight")
        entry = weight_entry(name, weight.shape, tensor, layout, DATA_FILE, offset, weight.size * 4,
                             weight_digest(weight), patchable=patchable, note=note)
        if nbytes != weight.size * 4:   # a slice of a fused tensor: file/offset/nbytes describe the whole tensor
            entry.update(nbytes=nbytes, tensor_shape=dims[tensor], out_offset=out_offset)
        entries.append(entry)
    return entries


def _manifest(model, info, wrapper: PastPresentDecoder, weights: list[dict], parity: dict, max_seq_len: int) -> dict:
    import onnxruntime

    cfg, arch = model.config, wrapper.arch
    inputs, outputs = wrapper.io_names()
    return {
        **manifest_head("onnxruntime", info, weights),
        "io": {
            "inputs": inputs, "outputs": outputs,
            "dtypes": {"input_ids": "int64", "attention_mask": "int64", "position_ids": "int64",
                       "past": "float32", "logits": "float32"},
            "cache": {
                **cache_spec(arch, "past_present", max_seq_len),
                "layout": "[batch, num_heads, past_len, head_dim]", "initial_past_len": 0,
                "past": [n for n in inputs if n.startswith("past.")],
                "present": [n for n in outputs if n.startswith("present.")],
            },
            # position_ids are 0-based (cumsum(attention_mask) - 1 for the new tokens); the graph adds any offset.
            "position_ids": "0-based", "position_offset_in_graph": arch.position_offset,
            "max_positions": max_seq_len,
            **token_ids(cfg),
        },
        "files": {
            "model": MODEL_FILE, "data": DATA_FILE, "alignment": ALIGN, "tokenizer": None,
            "graph_optimization_level": onnx_verify.OPT_LEVEL,
            # ORT prepacks constant MatMul weights into private copies; without this, patches made in place in
            # buffers given through SessionOptions.add_initializer are silently ignored (see docs/exporters.md).
            "session_config": dict(onnx_verify.SESSION_CONFIG),
        },
        "export": {
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "opset": OPSET, "architecture": arch.summary(), "parity": parity,
        },
    }
