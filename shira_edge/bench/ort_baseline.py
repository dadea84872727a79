"""ONNX Runtime pieces of the benchmark that are not the shira-edge runtime: the base model in its best
configuration, LoRA fused into our own weight buffers, the naive fully-fused reload, and unfused LoRA on side
branches (the way ONNX Runtime's multi-LoRA support runs adapters: A and B are extra graph inputs).

    >>> from pathlib import Path                                                    # doctest: +SKIP
    >>> baseline = OrtBaseline(Path("out/"), read_manifest("out/"), threads=2)      # doctest: +SKIP
    >>> sess = baseline.base_session(); sess.run(["logits"], baseline.feeds("decode"))   # doctest: +SKIP

"Best configuration" is what a plain app would ship: ORT_ENABLE_ALL with prepacking on (the ORT default), threads
fixed. The exporter's own setting (EXTENDED, prepacking off) exists so patches are visible; the base must not pay
for that.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from ..runtime.onnx_backend import decoder_feeds
from .adapters import LoraFactors, patchable
from .engines import shape_of

LORA_DIR = "lora-side-branches"


class OrtBaseline:
    """What the bench compares the runtime with on ONNX Runtime: plain sessions, their feeds, LoRA side branches."""

    def __init__(self, export_dir: Path, manifest: dict, threads: int):
        self.dir, self.manifest, self.threads = Path(export_dir), manifest, threads
        self.model_path = self.dir / manifest["files"]["model"]
        cache = manifest["io"]["cache"]
        self.layers, self.heads, self.head_dim = cache["num_layers"], cache["num_heads"], cache["head_dim"]
        self.vocab = manifest["io"]["vocab_size"]
        self.weights = patchable(manifest)

    def options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        return so

    def base_session(self, model_path: Path | None = None) -> ort.InferenceSession:
        return ort.InferenceSession(str(model_path or self.model_path), self.options(),
                                    providers=["CPUExecutionProvider"])

    # ---------------------------------------------------------------- inputs

    def feeds(self, kind: str, seed: int = 0) -> dict[str, np.ndarray]:
        """kind: "decode" (1 token, engines.DECODE_PAST in the cache) or "prefill_N" (N tokens, empty cache)."""
        seq, past = shape_of(kind)
        rng = np.random.default_rng(seed)
        ids = rng.integers(4, self.vocab, size=(1, seq), dtype=np.int64)
        names = self.manifest["io"]["cache"]["past"]
        cache = [rng.standard_normal((1, self.heads, past, self.head_dim), dtype=np.float32) for _ in names]
        return decoder_feeds(ids, np.ones((1, past + seq), np.int64), np.arange(past, past + seq, dtype=np.int64)[None],
                             names, cache)

    # ---------------------------------------------------------------- unfused LoRA on side branches

    def lora_graph(self, dest: Path) -> Path:
        """A copy of the graph where every patchable MatMul(x, W) becomes MatMul(x, W) + MatMul(MatMul(x, A), B),
        with A [in, r] and B [r, out] graph inputs named lora.<tensor>.A / .B (r is a dynamic dimension).
        The weight data file is shared (hard link, else copy), not rewritten."""
        dest.mkdir(parents=True, exist_ok=True)
        proto = onnx.load(str(self.model_path), load_external_data=False)
        by_tensor = {w["tensor"]: w for w in self.weights}
        nodes = []
        for node in proto.graph.node:
            nodes.append(node)
            w = by_tensor.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
            if w is None:
                continue
            m, n = w["shape"]
            a, b, y = f"lora.{w['tensor']}.A", f"lora.{w['tensor']}.B", node.output[0]
            proto.graph.input.extend([helper.make_tensor_value_info(a, TensorProto.FLOAT, [n, "lora_r"]),
                                      helper.make_tensor_value_info(b, TensorProto.FLOAT, ["lora_r", m])])
            node.output[0] = f"{y}.base"
            nodes += [helper.make_node("MatMul", [node.input[0], a], [f"{y}.xa"], name=f"{a}.mm"),
                      helper.make_node("MatMul", [f"{y}.xa", b], [f"{y}.xab"], name=f"{b}.mm"),
                      helper.make_node("Add", [f"{y}.base", f"{y}.xab"], [y], name=f"{y}.lora_add")]
        if len(nodes) != len(proto.graph.node) + 3 * len(self.weights):
            raise RuntimeError(f"{self.model_path}: expected one MatMul per patchable weight to add LoRA branches to")
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        onnx.save_model(proto, str(dest / self.model_path.name))
        data = self.manifest["files"]["data"]
        if not (dest / data).exists():
            try:
                os.link(self.dir / data, dest / data)
            except OSError:
                shutil.copyfile(self.dir / data, dest / data)
        return dest / self.model_path.name

    def lora_feeds(self, factors: list[LoraFactors]) -> dict[str, np.ndarray]:
        """The side-branch inputs for these factors, in the graph's orientation (x @ A^T @ B^T)."""
        tensor = {w["name"]: w["tensor"] for w in self.weights}
        return {k: v for f in factors for k, v in
                ((f"lora.{tensor[f.name]}.A", np.ascontiguousarray(f.A.T)),
                 (f"lora.{tensor[f.name]}.B", np.ascontiguousarray(f.B.T)))}
