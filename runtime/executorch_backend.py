"""ExecuTorch backend: adapters are scattered straight into XNNPACK's packed weights (no reload), or, where that
cannot be proven to work, into a private copy of model.ptd followed by a reload of the method.

`switch_path` says which one runs (and `fallback_reason` why not the first):

- "packed-in-place" (runtime/et_packed.py): the program is loaded by the native runner (runtime/et_native.py) over a
  private XNNPACK weight-cache file on a memfd, which we map as `flat`; slots map each weight's (row, col) into
  its packed block. A switch is the scatter; `after_scatter` has nothing to do. Torch is never imported.
- "reload" (`ReloadProgram`, the proven path): a private `bytes` copy of the .ptd is `flat`, in the export's own
  layout; a switch is the scatter plus a reload through the Python bindings, which makes XNNPACK repack. Used when
  the packed path is unavailable (no compiler, another executorch, a failed layout check or self-test), which is
  said once per reason (a PackedPathWarning), or when asked for with `in_place=False` (e.g. the LoRA-fusion
  baseline of the bench).

Stale packed weights: XNNPACK's weight cache finds entries by name only, so a reload over a kept cache would be
served the old (or patched) packing. The reload path never uses the cache: the bindings' loads do not ask for it,
and the backend checks that the cache is off by default in this build (`_check_cache_off_by_default`) and, at
start-up, that a reload picks up a patch (`_check_reload_is_live`).

The static KV cache lives inside the program (batch 1, one sequence at a time).
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from pathlib import Path

import numpy as np

from .backend import slots_from_manifest

POLICIES = ("auto", "packed")
_SAID: set[str] = set()   # fallback reasons already reported in this process


def _say_once(message: str) -> None:
    from .onnx_backend import PackedPathWarning   # one warning class for both backends' fallbacks (stdlib only)

    if message not in _SAID:
        _SAID.add(message)
        warnings.warn(message, PackedPathWarning, stacklevel=3)


class ExecuTorchBackend:
    backend = "executorch"
    batch_limit = 1

    def __init__(self, export_dir, manifest: dict, *, policy: str = "auto", threads: int | None = None,
                 in_place: bool = True):
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: a switch on ExecuTorch returns with the program at full speed, so "
                             f"it supports {POLICIES} (the same thing there); use an ONNX export for 'instant'")
        self.dir = Path(export_dir)
        files = manifest.get("files", {})
        self._pte = self.dir / files.get("program", "model.pte")
        self._data = self.dir / files.get("data", "model.ptd")
        io = manifest["io"]
        self.max_seq_len = int(io["cache"]["max_seq_len"])
        if io["cache"].get("kernels"):   # the program calls ExecuTorch's LLM kernels: register them before loading
            from .et_native import load_llm_kernels

            load_llm_kernels()
        self._run_lock = threading.Lock()   # one method, one static cache: runs take turns
        self.sequence_lock = threading.RLock()   # held by a whole generation, so two never share the cache
        self._program, self.switch_path = None, "reload"
        self.fallback_reason = None if in_place else "in_place=False"
        if in_place:
            self._program = self._packed(manifest, threads)
        if self._program is None:
            self._program = ReloadProgram(self._pte, self._data, manifest, threads)
        else:
            self.switch_path = "packed-in-place"
        self.flat, self.slots = self._program.flat, self._program.slots

    def _packed(self, manifest: dict, threads):
        from . import et_native
        from .et_packed import PackedPathUnavailable, PackedProgram

        try:
            lib = et_native.library()
            et_native.set_threads(lib, threads)
            return PackedProgram(lib, self._pte, self._data, manifest, int(manifest["io"]["vocab_size"]))
        except (PackedPathUnavailable, et_native.NativeUnavailable) as exc:
            self.fallback_reason = str(exc)
            _say_once(f"ExecuTorch: switching in place in XNNPACK's packed weights is unavailable here ({exc}); "
                      f"falling back to reloading the method on every switch (~a full load per switch)")
            return None

    # ------------------------------------------------------------------ weights

    def weights_changed(self) -> None:
        pass

    def after_scatter(self) -> None:
        self._program.after_scatter()

    def weights_reverted(self) -> None:
        """The runtime wrote the previous state back after a failed after_scatter: make it live again."""
        self._program.after_scatter()

    @property
    def ready(self) -> bool:
        return True

    def wait_ready(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        program, self._program = getattr(self, "_program", None), None
        self.flat = None
        if program is not None:
            program.close()

    # ------------------------------------------------------------------ running

    def _execute(self, ids: np.ndarray, start: int) -> np.ndarray:
        seq = ids.shape[1]
        if start + seq > self.max_seq_len:
            raise ValueError(f"{start + seq} tokens exceed this ExecuTorch export's static cache of "
                             f"{self.max_seq_len}; re-export with a larger --max-seq-len")
        with self._run_lock:
            return self._program.forward(ids, start)

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


class ReloadProgram:
    """The reload path: a private copy of model.ptd is `flat`; after a scatter the program is loaded again from it.

    XNNPACK packs each Linear weight on the method's first execute and reads only its packed copy afterwards, so a
    patch is made live by loading the program again from the patched bytes and running one token. The loader takes
    the data map as a `bytes` object and reads it in place (no copy), for the constants it does not pack
    (embeddings, LayerNorms) during every run. So one `bytes` copy of the .ptd is kept and written through a
    writable view; nothing else holds or hashes that object. The Python bindings take torch tensors and load
    libtorch, so torch is imported here (lazily), only to wrap numpy arrays at the bindings' edge.
    """

    def __init__(self, pte: Path, data_file: Path, manifest: dict, threads: int | None):
        import torch   # noqa: F401  (the bindings need libtorch loaded first)

        from . import et_compat

        self._torch = torch
        self._check_cache_off_by_default()
        self._load = et_compat.load_from_buffer
        if threads:   # the same process-wide pool as the native runner's: size it where its programs are counted
            from . import et_native

            try:
                et_native.set_threads(et_native.library(), threads)
            except et_native.NativeUnavailable:
                et_compat.reset_threadpool(threads)
        self.dir = data_file.parent
        self._pte = pte.read_bytes()
        self._ptd = data_file.read_bytes()
        # A writable view of the bytes object the loader reads (it accepts nothing else and does not copy it).
        address = ctypes.cast(ctypes.c_char_p(self._ptd), ctypes.c_void_p).value
        raw = (ctypes.c_uint8 * len(self._ptd)).from_address(address)
        self.flat = np.frombuffer(raw, dtype="<f4", count=len(self._ptd) // 4)
        for w in manifest["weights"]:
            if w["file"] != data_file.name or w["offset"] % 4:
                raise ValueError(f"{self.dir}/manifest.json: {w['name']} is at {w['file']}+{w['offset']}, not a "
                                 f"4-byte aligned offset in {data_file.name}; re-export with this shira-edge")
        self.slots = slots_from_manifest(manifest, self.dir, lambda w: (w["offset"] // 4, None))
        self._module = None
        self._reload()
        self._check_reload_is_live()

    @staticmethod
    def _check_cache_off_by_default() -> None:
        # With XNNPACK's weight cache on by default, the bindings' loads would share packed weights by name.
        from . import et_native

        try:
            on = et_native.default_weight_cache(et_native.library())
        except et_native.NativeUnavailable:
            return   # no native runner, so no cache file of ours either; _check_reload_is_live still guards
        if on:
            raise RuntimeError("this executorch build turns XNNPACK's weight cache on by default, so a reload "
                               "could be served stale packed weights; use a build without "
                               "ENABLE_XNNPACK_WEIGHTS_CACHE")

    def _reload(self) -> None:
        self._module = None             # release the old packed weights first
        self._module = self._load(self._pte, self._ptd)
        # XNNPACK packs on the first execute, not at load: pay it here with one token, so the switch returns
        # with the program at full speed. (It writes cache slot 0, which every sequence overwrites first.)
        self.forward(np.zeros((1, 1), np.int64), 0)

    def after_scatter(self) -> None:
        self._reload()

    def _check_reload_is_live(self) -> None:
        slot = next(s for s in reversed(self.slots.values()) if s.patchable)
        view = self.flat[slot.start: slot.start + slot.tensor_size]
        saved = view.copy()
        ids = np.array([[2, 3, 4, 5]], np.int64)
        before = self.forward(ids, 0)
        try:
            view *= 2
            self._reload()
            moved = not np.array_equal(self.forward(ids, 0), before)
        finally:
            view[:] = saved
            self._reload()
        if not moved:
            raise RuntimeError(f"{self.dir}: after patching {slot.name} and reloading, ExecuTorch still computes "
                               f"with the old weights (an XNNPACK weight cache keyed at export?); switching cannot "
                               f"work with this executorch build; rebuild it without the XNNPACK weight cache")

    def forward(self, ids: np.ndarray, start: int) -> np.ndarray:
        torch = self._torch
        seq = ids.shape[-1]
        out = self._module.forward([torch.from_numpy(np.ascontiguousarray(ids).reshape(1, seq)),
                                    torch.arange(start, start + seq, dtype=torch.int64)])
        return out[0].numpy().copy()

    def close(self) -> None:
        self._module = None
