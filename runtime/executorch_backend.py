"""ExecuTorch backend: a private copy of model.ptd is the patch target; a switch reloads the program from it.

XNNPACK packs each Linear weight on the method's first execute and reads only its packed copy afterwards, so a
patch is made live by loading the program again from the patched bytes and running one token (docs/runtime.md).
The loader takes the data map as a `bytes` object and reads it in place (no copy), for the constants it does not
pack (embeddings, LayerNorms) during every run. The backend therefore keeps one `bytes` copy of the .ptd and
writes into it through a writable view; nothing else holds or hashes that object.

Stale packed weights: where a build enables XNNPACK's weight cache, packed weights are keyed by their named-data
key, which is fixed at export, so a reload could be served the old packing. The backend drops the old module before
loading the new one (releasing its cache entries), and at start-up it proves that a reload picks up a patch: it
doubles one weight, reloads, checks that the logits move, and restores (`_check_reload_is_live`).

The ExecuTorch Python bindings take and return torch tensors and load libtorch, so this module imports torch
lazily, only to wrap numpy arrays at the binding's edge; on a device the C++ runtime does the same with raw
buffers. The static KV cache lives inside the program (batch 1, one sequence at a time).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from .patch import Slot

POLICIES = ("auto", "packed")


class ExecuTorchBackend:
    backend = "executorch"
    batch_limit = 1

    def __init__(self, export_dir, manifest: dict, *, policy: str = "auto", threads: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: an ExecuTorch export reloads its method on every switch, so it "
                             f"supports {POLICIES} (the same thing there); use an ONNX export for 'instant'")
        import torch   # noqa: F401  (the bindings need libtorch loaded first; see the module docstring)
        from executorch.extension.pybindings import portable_lib

        self._torch = torch
        self._load = portable_lib._load_for_executorch_from_buffer
        if threads:
            portable_lib._unsafe_reset_threadpool(int(threads))
        self.dir = Path(export_dir)
        self.policy = policy
        files = manifest.get("files", {})
        self._pte = (self.dir / files.get("program", "model.pte")).read_bytes()
        data_file = self.dir / files.get("data", "model.ptd")
        self._ptd = data_file.read_bytes()
        # A writable view of the bytes object the loader reads (it accepts nothing else and does not copy it).
        address = ctypes.cast(ctypes.c_char_p(self._ptd), ctypes.c_void_p).value
        raw = (ctypes.c_uint8 * len(self._ptd)).from_address(address)
        self.flat = np.frombuffer(raw, dtype="<f4", count=len(self._ptd) // 4)
        self.slots = {}
        for w in manifest["weights"]:
            if w["file"] != data_file.name or w["offset"] % 4:
                raise ValueError(f"{self.dir}/manifest.json: {w['name']} is at {w['file']}+{w['offset']}, not a "
                                 f"4-byte aligned offset in {data_file.name}; re-export with this shira-edge")
            out, inp = w["shape"]
            self.slots[w["name"]] = Slot(w["name"], out, inp, w["layout"], w["offset"] // 4, data_file,
                                         w["offset"], w["digest"], w["patchable"])
        io = manifest["io"]
        self.max_seq_len = int(io["cache"]["max_seq_len"])
        self.eos_token_id = io.get("eos_token_id")
        self._run_lock = threading.Lock()   # one method, one static cache: runs take turns
        self.sequence_lock = threading.RLock()   # held by a whole generation, so two never share the cache
        self._module = None
        self._reload()
        self._check_reload_is_live()

    # ------------------------------------------------------------------ weights

    def _reload(self) -> None:
        self._module = None             # release the old packed weights (and any cache entries) first
        self._module = self._load(self._pte, self._ptd)
        # XNNPACK packs on the first execute, not at load: pay it here with one token, so the switch returns
        # with the program at full speed. (It writes cache slot 0, which every sequence overwrites first.)
        self._execute(np.zeros((1, 1), np.int64), 0)

    def weights_changed(self) -> None:
        pass

    def after_scatter(self) -> None:
        self._reload()

    def _check_reload_is_live(self) -> None:
        slot = next(s for s in reversed(self.slots.values()) if s.patchable)
        view = self.flat[slot.start: slot.start + slot.out * slot.inp]
        saved = view.copy()
        ids = np.array([[2, 3, 4, 5]], np.int64)
        before = self._forward1(ids)
        try:
            view *= 2
            self._reload()
            moved = not np.array_equal(self._forward1(ids), before)
        finally:
            view[:] = saved
            self._reload()
        if not moved:
            raise RuntimeError(f"{self.dir}: after patching {slot.name} and reloading, ExecuTorch still computes "
                               f"with the old weights (an XNNPACK weight cache keyed at export?); switching cannot "
                               f"work with this executorch build; rebuild it without the XNNPACK weight cache")

    @property
    def ready(self) -> bool:
        return True

    def wait_ready(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        self._module = None

    # ------------------------------------------------------------------ running

    def _execute(self, ids: np.ndarray, start: int) -> np.ndarray:
        torch = self._torch
        seq = ids.shape[1]
        if start + seq > self.max_seq_len:
            raise ValueError(f"{start + seq} tokens exceed this ExecuTorch export's static cache of "
                             f"{self.max_seq_len}; re-export with a larger --max-seq-len")
        with self._run_lock:
            out = self._module.forward([torch.from_numpy(np.ascontiguousarray(ids)),
                                        torch.arange(start, start + seq, dtype=torch.int64)])
            return out[0].numpy().copy()

    def _forward1(self, ids: np.ndarray) -> np.ndarray:
        return self._execute(ids, 0)

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        with self.sequence_lock:
            return np.concatenate([self._execute(row[None], 0) for row in input_ids], axis=0)

    def step(self, input_ids: np.ndarray, cache: dict | None):
        """Tokens after `cache["pos"]` earlier ones (the cache itself is inside the program): (logits, cache)."""
        if input_ids.shape[0] != 1:
            raise ValueError("the ExecuTorch export runs batch 1 with a KV cache; step one sequence at a time")
        pos = 0 if cache is None else cache["pos"]
        with self.sequence_lock:
            logits = self._execute(input_ids, pos)
        return logits, {"pos": pos + input_ids.shape[1]}
