"""ONNX Runtime backend: weight buffers the runtime owns, a "direct" session that sees patches at once and a
"packed" session at the base model's speed.

ORT prepacks constant MatMul weights into private copies when a session is created, so a patch made in place is
invisible to a prepacked session. This backend therefore

- keeps every patchable weight in one C-contiguous float32 buffer (`flat`), handed to ORT through
  `SessionOptions.add_initializer`, which uses the memory as is (no copy);
- builds a *direct* session with prepacking off over those buffers: a scatter into `flat` is live in it at once,
  at 1.0-1.7x the base latency (measured in docs/runtime.md);
- builds a *packed* session (prepacking on) from the same buffers, which runs at the base model's speed but must be
  rebuilt (about 1 s for opt-125m) after every switch.

The policy decides which sessions exist and when a switch returns:

- "instant": direct only. A switch is a scatter (milliseconds); every run pays the unpacked cost.
- "packed":  packed only. A switch is a scatter plus a rebuild; runs wait for it; every run is at full speed.
- "auto":    both. Right after a switch runs use the direct session while a background thread builds a packed one
             from the patched buffers; it is swapped in when it is ready, unless another switch came first.

    >>> be = OnnxBackend("out/", read_manifest("out/"), policy="auto")     # doctest: +SKIP
    >>> be.flat[positions] = values; be.weights_changed(); be.wait_ready()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from pathlib import Path

import numpy as np

from .patch import Slot

POLICIES = ("auto", "instant", "packed")
ALIGN_ELEMENTS = 16     # each weight starts on a 64-byte line, so no cache line is shared by two weights


class OnnxBackend:
    backend = "onnxruntime"
    batch_limit = None   # any batch size
    sequence_lock = contextlib.nullcontext()   # the KV cache travels with each call: sequences run side by side

    def __init__(self, export_dir, manifest: dict, *, policy: str = "auto", threads: int | None = None):
        import onnxruntime as ort

        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} is not one of {POLICIES}")
        self._ort = ort
        self.dir = Path(export_dir)
        self.policy = policy
        self.threads = threads
        files = manifest.get("files", {})
        self.model_path = self.dir / files.get("model", "model.onnx")
        self.opt_level = files.get("graph_optimization_level", "ORT_ENABLE_EXTENDED")
        self.extra_config = {k: v for k, v in files.get("session_config", {}).items()
                             if k != "session.disable_prepacking"}   # prepacking is this backend's choice
        io = manifest["io"]
        cache = io["cache"]
        self.past_names, self.present_names = list(cache["past"]), list(cache["present"])
        self.heads, self.head_dim = int(cache["num_heads"]), int(cache["head_dim"])
        self.eos_token_id = io.get("eos_token_id")

        self.slots, self.flat = self._load_buffers(manifest)
        self._ortvalues = {}   # tensor name -> OrtValue over a view of flat; kept alive as long as the sessions
        for w in manifest["weights"]:
            if w["patchable"]:
                slot = self.slots[w["name"]]
                shape = (slot.out, slot.inp) if slot.layout == "as_is" else (slot.inp, slot.out)
                view = self.flat[slot.start: slot.start + slot.out * slot.inp].reshape(shape)
                self._ortvalues[w["tensor"]] = ort.OrtValue.ortvalue_from_numpy(view)

        self._state = threading.Condition()
        self._generation = 0          # bumped by every switch, before the scatter
        self._complete = 0            # the generation whose scatter has finished: the only one safe to build from
        self._packed = None           # (generation it was built at, session)
        self._retired = None          # a stale packed session waiting to be freed off the switch path
        self._direct = self._session(prepack=False) if policy != "packed" else None
        self._builder = None
        self._closed = False
        if policy == "packed":
            self._packed = (0, self._session(prepack=True))
        elif policy == "auto":
            self._builder = threading.Thread(target=self._build_loop, name="shira-packed-builder", daemon=True)
            self._builder.start()

    # ------------------------------------------------------------------ buffers

    def _load_buffers(self, manifest: dict) -> tuple[dict[str, Slot], np.ndarray]:
        slots, start = {}, 0
        for w in manifest["weights"]:
            out, inp = w["shape"]
            file = self.dir / w["file"]
            slots[w["name"]] = Slot(w["name"], out, inp, w["layout"], start if w["patchable"] else -1, file,
                                    w["offset"], w["digest"], w["patchable"])
            if w["patchable"]:
                start += -(-out * inp // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
        flat = np.zeros(start, np.float32)
        for slot in slots.values():
            if slot.patchable:
                n = slot.out * slot.inp
                try:
                    flat[slot.start: slot.start + n] = np.fromfile(slot.file, "<f4", n, offset=slot.offset)
                except (OSError, ValueError) as exc:
                    raise FileNotFoundError(f"{slot.file}: cannot read {slot.name} ({n * 4} bytes at offset "
                                            f"{slot.offset}): {exc}; re-export {self.dir}") from None
        return slots, flat

    # ------------------------------------------------------------------ sessions

    def _session(self, prepack: bool):
        ort = self._ort
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, self.opt_level)
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
            so.inter_op_num_threads = 1
        for key, value in self.extra_config.items():
            so.add_session_config_entry(key, str(value))
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in self._ortvalues.items():
            so.add_initializer(name, value)
        return ort.InferenceSession(str(self.model_path), so, providers=["CPUExecutionProvider"])

    def _build_loop(self) -> None:
        """Background: whenever the packed session is older than the weights, build one from the live buffers."""
        while True:
            with self._state:
                while not self._closed and (self._complete != self._generation or
                                            (self._packed is not None and self._packed[0] == self._generation)):
                    self._state.wait()
                if self._closed:
                    return
                generation = self._generation
                retired, self._retired = self._retired, None
            del retired     # the stale packed session, freed here before its successor is packed
            # Built without the lock: a switch during the build bumps the generation and the result is dropped,
            # since it may have read half-written buffers.
            release_freed_memory()
            session = self._session(prepack=True)
            with self._state:
                if generation == self._generation:
                    self._packed = (generation, session)
                    self._state.notify_all()
            del session     # or this frame keeps it (and its prepacked copy) alive until the next build

    def weights_changed(self) -> None:
        """Called by the runtime under its write lock right before the scatter: the packed session is now stale."""
        with self._state:
            self._generation += 1
            # Freeing a prepacked copy takes tens of ms: leave it to the builder (or the rebuild), off this path.
            self._retired, self._packed = self._packed, None

    def after_scatter(self) -> None:
        """Called under the write lock after the scatter: the buffers are whole again."""
        if self.policy == "packed":     # rebuild now; runs wait on the runtime's lock meanwhile
            self._retired = None
            release_freed_memory()
            session = self._session(prepack=True)
        with self._state:
            self._complete = self._generation
            if self.policy == "packed":
                self._packed = (self._generation, session)
            self._state.notify_all()

    def session(self):
        """The fastest session that shows the live weights."""
        packed = self._packed
        if packed is not None and packed[0] == self._generation:
            return packed[1]
        return self._direct

    @property
    def ready(self) -> bool:
        packed = self._packed
        return self.policy == "instant" or (packed is not None and packed[0] == self._generation)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until runs go at full speed (the packed session for the live weights is in place)."""
        with self._state:
            return self._state.wait_for(lambda: self.ready or self._closed, timeout)

    def close(self) -> None:
        with self._state:
            self._closed = True
            self._state.notify_all()
        if self._builder is not None:
            self._builder.join()
        self._packed = self._retired = self._direct = None

    # ------------------------------------------------------------------ running

    def empty_cache(self, batch: int) -> dict:
        empty = np.zeros((batch, self.heads, 0, self.head_dim), np.float32)
        return {"past": [empty] * len(self.past_names), "mask": np.zeros((batch, 0), np.int64)}

    def step(self, input_ids: np.ndarray, cache: dict | None):
        """Run new tokens after the cached ones: (logits [B, S, V], the new cache)."""
        batch, seq = input_ids.shape
        cache = cache or self.empty_cache(batch)
        past_len = cache["mask"].shape[1]
        mask = np.concatenate([cache["mask"], np.ones((batch, seq), np.int64)], axis=1)
        feeds = {"input_ids": input_ids, "attention_mask": mask,
                 "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))}
        feeds.update(zip(self.past_names, cache["past"]))
        logits, *present = self.session().run(["logits", *self.present_names], feeds)
        return logits, {"past": present, "mask": mask}

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        batch, seq = input_ids.shape
        feeds = {"input_ids": input_ids, "attention_mask": np.ones((batch, seq), np.int64),
                 "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq))}
        feeds.update(zip(self.past_names, self.empty_cache(batch)["past"]))
        return self.session().run(["logits"], feeds)[0]


def release_freed_memory() -> None:
    """Give the freed prepacked copy of a dropped session back to the OS before packing the next one.

    Measured on opt-125m (docs/runtime.md): without it glibc keeps the freed buffers in its heap and the process
    grows by ~700 MB over a few switches ("auto"); with it, it stays flat. No-op where glibc is absent.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
