"""Check an exported ONNX model the way the runtime will run it: through ONNX Runtime, with every patchable weight
handed in from a buffer we own (SessionOptions.add_initializer), at the graph optimization level we ship.

    check_optimized_graph(model_path, names)  # each weight is still an initializer feeding a MatMul after ORT's passes
    onnx_parity(out_dir, hf_model, weights)   # full forward and prefill + token-by-token decode vs PyTorch logits
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .common import ExportError

# EXTENDED: ORT's fusions (LayerNorm, MatMul+scale, transposes) without level-3 hardware-specific layouts, so an
# optimized model is portable across CPUs. The adaptable weights survive it untouched (checked per export).
OPT_LEVEL = "ORT_ENABLE_EXTENDED"
# Prepacking copies constant MatMul weights into ORT-private buffers, which hides in-place patches.
SESSION_CONFIG = {"session.disable_prepacking": "1"}
WEIGHT_READERS = ("MatMul", "Gemm", "FusedMatMul")
PREFILL = 3  # the decode check prefills this many tokens, then feeds the rest one at a time


def session_options(optimized_path: str | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVEL)
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    if optimized_path:
        so.optimized_model_filepath = optimized_path
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return so


def check_optimized_graph(model_path: Path, tensor_names: list[str]) -> None:
    """Each name must still be an initializer read only by MatMul/Gemm nodes in ORT's optimized graph; else the
    runtime's add_initializer override would miss a folded or fused copy."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(model_path), session_options(optimized), providers=["CPUExecutionProvider"])
        graph = onnx.load(optimized, load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    for name in tensor_names:
        readers = {n.op_type for n in graph.node if name in n.input}
        if name not in inits or not readers or not readers <= set(WEIGHT_READERS):
            raise ExportError(f"{name}: after ONNX Runtime optimization ({OPT_LEVEL}) it is "
                              f"{'read by ' + str(sorted(readers)) if name in inits else 'gone'}; "
                              f"the runtime could not patch it")


@dataclass
class PatchableSession:
    """An ORT session whose patchable weights live in `buffers` (tensor name -> numpy array we own). ORT reads the
    arrays directly, so they and their OrtValues must outlive the session: this object keeps them together."""

    session: ort.InferenceSession
    buffers: dict[str, np.ndarray]
    _values: list = field(default_factory=list, repr=False)


def open_session(out_dir: Path, weights: list[dict]) -> PatchableSession:
    """Open model.onnx with each patchable weight read from the data file into its own buffer, as the runtime does."""
    so = session_options()
    buffers, values = {}, []
    for w in (w for w in weights if w["patchable"] and w["tensor"] not in buffers):   # slices share one tensor
        out, inp = w["shape"]
        shape = w.get("tensor_shape") or ((out, inp) if w["layout"] == "as_is" else (inp, out))
        buf = np.fromfile(Path(out_dir) / w["file"], dtype="<f4", count=w["nbytes"] // 4, offset=w["offset"])
        buffers[w["tensor"]] = buf = buf.reshape(shape)
        values.append(ort.OrtValue.ortvalue_from_numpy(buf))
        so.add_initializer(w["tensor"], values[-1])
    sess = ort.InferenceSession(str(Path(out_dir) / "model.onnx"), so, providers=["CPUExecutionProvider"])
    return PatchableSession(sess, buffers, values)


def parity_prompt(vocab_size: int, bos: int | None, pad: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A fixed batch of 2 x 10 tokens; the second row is left-padded by 3, so the mask input is exercised too."""
    bos = 1 if bos is None else bos
    ids = np.random.default_rng(0).integers(4, vocab_size, size=(2, 10), dtype=np.int64)
    ids[:, 0] = bos
    mask = np.ones_like(ids)
    ids[1, :3], mask[1, :3] = (0 if pad is None else pad), 0
    ids[1, 3] = bos
    return ids, mask


def run(sess, num_layers: int, ids, mask, positions, past=None):
    """One step: returns (logits, present list)."""
    from shira_edge.runtime.onnx_backend import decoder_feeds

    batch = ids.shape[0]
    if past is None:
        meta = {i.name: i.shape for i in sess.get_inputs()}
        _, heads, _, head_dim = meta["past.0.key"]
        past = [np.zeros((batch, heads, 0, head_dim), np.float32) for _ in range(2 * num_layers)]
    names = [f"past.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    logits, *present = sess.run(None, decoder_feeds(ids, mask, positions, names, past))
    return logits, present


def positions_of(mask: np.ndarray) -> np.ndarray:
    """0-based positions of the real tokens of left-padded rows (what OPT itself derives from the mask)."""
    return (np.cumsum(mask, axis=1) * mask - 1).astype(np.int64)


def torch_logits(hf_model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The PyTorch reference, with the positions given explicitly (Llama-family models do not derive them from
    the mask)."""
    with torch.no_grad():
        return hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(positions_of(mask))).logits.numpy()


def onnx_parity(out_dir: Path, hf_model, weights: list[dict], atol: float = 1e-4) -> dict:
    """Full forward and prefill + token-by-token decode of the ONNX export vs PyTorch, else ExportError."""
    cfg = hf_model.config
    ids, mask = parity_prompt(cfg.vocab_size, cfg.bos_token_id, cfg.pad_token_id)
    positions = positions_of(mask)
    expected = torch_logits(hf_model, ids, mask)
    patched = open_session(out_dir, weights)  # held until return: ORT reads its buffers
    sess = patched.session
    layers = cfg.num_hidden_layers
    full, _ = run(sess, layers, ids, mask, positions)
    steps, present = [], None
    for start, stop in [(0, PREFILL)] + [(t, t + 1) for t in range(PREFILL, ids.shape[1])]:
        logits, present = run(sess, layers, ids[:, start:stop], mask[:, :stop], positions[:, start:stop], present)
        steps.append(logits)
    decoded = np.concatenate(steps, axis=1)
    real = mask.astype(bool)  # padded positions have no meaningful logits in either model
    result = {
        "prompt": f"batch {ids.shape[0]} x {ids.shape[1]} tokens (seed 0), row 1 left-padded by 3",
        "max_abs_diff_full": float(np.abs(full - expected)[real].max()),
        "max_abs_diff_decode": float(np.abs(decoded - expected)[real].max()),
        "decode": f"prefill {PREFILL} then 1 token per step with the KV cache",
        "atol": atol,
    }
    for key in ("max_abs_diff_full", "max_abs_diff_decode"):
        if not result[key] <= atol:  # also catches NaN
            raise ExportError(f"parity check failed: {key} = {result[key]:.3g} > {atol:g} (ONNX Runtime vs PyTorch "
                              f"logits on the fixed prompt); the export is wrong, nothing was written")
    return result
