"""One interface over both backends for the timed loops: what a "decode" or "prefill_N" call is, for the base model
in its best configuration, for a fully fused model loaded from disk, and for anything with the runtime's
`step(input_ids, cache)` (a `Runtime`, or one of its backends driven by the LoRA baseline).

    >>> kinds()
    ['decode', 'prefill_32', 'prefill_128']

decode = 1 new token with DECODE_PAST tokens already in the KV cache; prefill_N = N tokens into an empty cache.
ONNX Runtime's base is a plain session from model.onnx at ORT_ENABLE_ALL with prepacking on (ORT's defaults), and at
the export's own level too, since "best" is whichever is faster here. ExecuTorch's base is `Runtime.load_program`
of the shipped .pte/.ptd.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DECODE_PAST = 32          # decode: 1 new token after a 32-token prompt held in the KV cache
PREFILLS = (32, 128)


def kinds() -> list[str]:
    return ["decode"] + [f"prefill_{n}" for n in PREFILLS]


def shape_of(kind: str) -> tuple[int, int]:
    """(new tokens, tokens already cached)"""
    return (1, DECODE_PAST) if kind == "decode" else (int(kind.split("_")[1]), 0)


def token_ids(kind: str, vocab: int, seed: int = 0) -> np.ndarray:
    seq, _ = shape_of(kind)
    return np.random.default_rng(seed).integers(4, vocab, size=(1, seq), dtype=np.int64)


def runtime_cache(manifest: dict, kind: str, seed: int = 0):
    """The `cache` argument of Runtime.step for this kind (None: empty), with DECODE_PAST random past entries."""
    seq, past = shape_of(kind)
    if not past:
        return None
    if manifest["backend"] == "executorch":
        return {"pos": past}   # the static cache lives inside the program
    c = manifest["io"]["cache"]
    rng = np.random.default_rng(seed)
    shape = (1, c["num_heads"], past, c["head_dim"])
    return {"past": [rng.standard_normal(shape, dtype=np.float32) for _ in c["past"]],
            "mask": np.ones((1, past), np.int64)}


def stepper(obj, manifest: dict, kind: str):
    """A no-argument callable running one `kind` call through obj.step (Runtime or runtime backend)."""
    ids, cache = token_ids(kind, manifest["io"]["vocab_size"]), runtime_cache(manifest, kind)
    return lambda: obj.step(ids, cache)


class PlainModel:
    """A model loaded the plain way (no shira-edge runtime) with a `step`-like call per kind."""

    def __init__(self, backend: str, export_dir: Path, manifest: dict, threads: int, model_dir: Path | None = None,
                 level: str = "ORT_ENABLE_ALL", extra_feeds: dict | None = None, model_path: Path | None = None):
        self.backend, self.manifest = backend, manifest
        model_dir = Path(model_dir or export_dir)
        if backend == "onnxruntime":
            import onnxruntime as ort

            from .ort_baseline import OrtBaseline

            self._side = OrtBaseline(Path(export_dir), manifest, threads)
            so = self._side.options()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            self._sess = ort.InferenceSession(str(model_path or model_dir / manifest["files"]["model"]), so,
                                              providers=["CPUExecutionProvider"])
            self._extra = extra_feeds or {}
        else:
            import torch  # noqa: F401  (the bindings need libtorch first)
            from executorch.runtime import Runtime as EtRuntime

            if manifest["io"]["cache"].get("kernels"):   # a program on ExecuTorch's LLM kernels, as the runtime does
                from shira_edge.runtime.et_native import load_llm_kernels

                load_llm_kernels()
            files = manifest["files"]
            program = EtRuntime.get().load_program(model_dir / files["program"], data_path=model_dir / files["data"])
            self._method = program.load_method(manifest["io"]["methods"][0])
            self._program = program

    def call(self, kind: str):
        """A no-argument callable running one `kind` call."""
        if self.backend == "onnxruntime":
            feeds = {**self._side.feeds(kind), **self._extra}
            return lambda: self._sess.run(["logits"], feeds)
        import torch

        seq, past = shape_of(kind)
        args = [torch.from_numpy(token_ids(kind, self.manifest["io"]["vocab_size"])),
                torch.arange(past, past + seq, dtype=torch.int64)]
        return lambda: self._method.execute(args)


def set_threads(threads: int) -> None:
    """Fix the thread pools this process has loaded: torch's (LoRA fusion) and ExecuTorch's. ONNX Runtime's are set
    per session and the scatter's per call. Nothing is imported here, so a memory baseline stays what it was."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if "executorch.extension.pybindings.portable_lib" in sys.modules:
        from ..runtime.et_compat import reset_threadpool

        reset_threadpool(threads)
