"""ONNX Runtime backend: one packed session whose packed weights a switch writes in place, or, where that cannot be
proven to work here, the older design that rebuilds packed sessions.

`switch_path` says which one runs:

- "packed-in-place" (runtime/onnx_packed.py): ORT saves its packed (MLAS packed-B) weights into a tmpfs file, one
  packed session computes from that file, and `flat` is the same file mapped writable. A switch is the scatter into
  the packed bytes: live and at the base model's speed when it returns. Chosen whenever its start-up checks pass.
- "rebuild" (`RebuildSessions` below): the runtime keeps every patchable weight in its own float32 buffer handed to
  ORT with `add_initializer`; a *direct* session (prepacking off) sees a scatter at once but runs unpacked; a
  *packed* session runs at full speed but is rebuilt after a switch (about 1 s for opt-125m). The policy chooses:
  "auto" serves from the direct session while a background thread rebuilds; "instant" keeps only the direct
  session; "packed" rebuilds inside the switch. With packed-in-place all three behave the same.

The fallback is taken, with one RuntimeWarning that says why, when the packed-in-place start-up fails (no tmpfs,
another ORT build or CPU whose packed weights are not where the probe says, a patch that does not reach the
kernels), or when asked for with in_place=False.

    >>> be = OnnxBackend("out/", read_manifest("out/"))            # doctest: +SKIP
    >>> be.switch_path                                              # doctest: +SKIP
    'packed-in-place'
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np

from .backend import slots_from_manifest
from .manifest import tensor_shape
from .onnx_packed import release_freed_memory

POLICIES = ("auto", "instant", "packed")
ALIGN_ELEMENTS = 16     # each weight starts on a 64-byte line, so no cache line is shared by two weights
PROBE_IDS = np.array([[2, 3, 4, 5, 6, 7]], np.int64)   # the start-up self-test's input


def decoder_feeds(input_ids, attention_mask, position_ids, past_names, past) -> dict:
    """The inputs of one step of an exported decoder graph (docs/exporters.md, Graph I/O): the new tokens, the mask
    over past + new tokens, their positions (None for a graph that derives them, e.g. an onnxruntime-genai builder's)
    and the KV cache, one array per name in `past_names` (manifest io.cache.past).

    >>> import numpy as np
    >>> sorted(decoder_feeds(np.ones((1, 2), np.int64), np.ones((1, 2), np.int64), None, ["past.0.key"],
    ...                      [np.zeros((1, 4, 0, 8), np.float32)]))
    ['attention_mask', 'input_ids', 'past.0.key']
    """
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        feeds["position_ids"] = position_ids
    feeds.update(zip(past_names, past))
    return feeds


class PackedPathWarning(RuntimeWarning):
    """The packed-in-place switch is unavailable here; the backend rebuilds packed sessions instead."""


class OnnxBackend:
    backend = "onnxruntime"
    batch_limit = None   # any batch size
    sequence_lock = contextlib.nullcontext()   # the KV cache travels with each call: sequences run side by side

    def __init__(self, export_dir, manifest: dict, *, policy: str = "auto", threads: int | None = None,
                 in_place: bool = True):
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
        cache = manifest["io"]["cache"]
        self.past_names, self.present_names = list(cache["past"]), list(cache["present"])
        self.heads, self.head_dim = int(cache["num_heads"]), int(cache["head_dim"])
        # onnxruntime-genai builder graphs (`export --from`) derive positions from attention_mask themselves
        self.takes_positions = "position_ids" in manifest["io"].get("inputs", ["position_ids"])
        self.fallback_reason = None if in_place else "in_place=False was asked for"
        self._impl = None
        if in_place:
            from .onnx_packed import PackedInPlace
            try:
                self._impl = PackedInPlace(ort, self.model_path, manifest["weights"], self.options,
                                           lambda session, ids: self._run(session, ids, None)[0], PROBE_IDS,
                                           lambda place: slots_from_manifest(manifest, self.dir, place))
            except Exception as exc:   # any failure to build or prove the cache: the proven path instead
                self.fallback_reason = str(exc)
                warnings.warn(f"{self.dir}: switching rebuilds ORT sessions (about 1 s to full speed) instead of "
                              f"writing into the packed weights, because {exc}", PackedPathWarning, stacklevel=3)
        if self._impl is None:
            self._impl = RebuildSessions(self, manifest)
        self.switch_path = "packed-in-place" if self.fallback_reason is None else "rebuild"
        self.slots, self.flat = self._impl.slots, self._impl.flat

    def options(self, prepack: bool = True):
        """Fresh SessionOptions of this export (threads, optimization level, its session config)."""
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
        return so

    # ------------------------------------------------------------------ the switch (see runtime/backend.py)

    def weights_changed(self) -> None:
        self._impl.weights_changed()

    def after_scatter(self) -> None:
        self._impl.after_scatter()

    def weights_reverted(self) -> None:
        self._impl.weights_reverted()

    @property
    def ready(self) -> bool:
        return self._impl.ready

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._impl.wait_ready(timeout)

    @property
    def start_timings(self) -> dict:
        """Seconds per start-up step of the packed-in-place path ({} on the rebuild path)."""
        return getattr(self._impl, "start_timings", {})

    def close(self) -> None:
        if self._impl is not None:
            self._impl.close()

    # ------------------------------------------------------------------ running

    def empty_cache(self, batch: int) -> dict:
        empty = np.zeros((batch, self.heads, 0, self.head_dim), np.float32)
        return {"past": [empty] * len(self.past_names), "mask": np.zeros((batch, 0), np.int64)}

    def _run(self, session, input_ids: np.ndarray, cache: dict | None):
        batch, seq = input_ids.shape
        cache = cache or self.empty_cache(batch)
        past_len = cache["mask"].shape[1]
        mask = np.concatenate([cache["mask"], np.ones((batch, seq), np.int64)], axis=1)
        positions = (np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))
                     if self.takes_positions else None)
        feeds = decoder_feeds(input_ids, mask, positions, self.past_names, cache["past"])
        logits, *present = session.run(["logits", *self.present_names], feeds)
        return logits, {"past": present, "mask": mask}

    def step(self, input_ids: np.ndarray, cache: dict | None):
        """Run new tokens after the cached ones: (logits [B, S, V], the new cache)."""
        return self._run(self._impl.session(), input_ids, cache)

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run(self._impl.session(), input_ids, None)[0]


class RebuildSessions:
    """The rebuild path: runtime-owned buffers under a direct and/or a packed session, per policy (module docstring).

    A generation counter, bumped before each scatter, and a "scatter complete" mark keep the background builder from
    building from half-written buffers; a build overtaken by a switch is dropped. A failed build is reported
    (`build_error`) and the builder waits for the next switch; it never dies of it.
    """

    def __init__(self, owner: OnnxBackend, manifest: dict):
        self._owner, self.policy = owner, owner.policy
        self.slots, self.flat = self._load_buffers(owner.dir, manifest)
        self._ortvalues = {}   # tensor name -> OrtValue over a view of flat; kept alive as long as the sessions
        for w in manifest["weights"]:
            slot = self.slots[w["name"]]
            if w["patchable"] and w["tensor"] not in self._ortvalues:
                view = self.flat[slot.start: slot.start + slot.tensor_size].reshape(slot.tensor_shape)
                self._ortvalues[w["tensor"]] = owner._ort.OrtValue.ortvalue_from_numpy(view)
        self._state = threading.Condition()
        self._generation = 0          # bumped by every switch, before the scatter
        self._complete = 0            # the generation whose scatter has finished: the only one safe to build from
        self._packed = None           # (generation it was built at, session)
        self._retired = None          # the previous state's packed session: freed off the switch path, or reinstated
        self.build_error = None       # the last failed build, as text
        self._closed = False
        self._direct = self._session(prepack=False) if self.policy != "packed" else None
        self._builder = None
        if self.policy == "packed":
            self._packed = (0, self._session(prepack=True))
        elif self.policy == "auto":
            self._builder = threading.Thread(target=self._build_loop, name="shira-packed-builder", daemon=True)
            self._builder.start()
            _OPEN.add(self)

    @staticmethod
    def _load_buffers(export_dir: Path, manifest: dict):
        sizes, starts = {}, {}
        for w in manifest["weights"]:
            if w["patchable"]:
                rows, cols = tensor_shape(w)
                sizes.setdefault(w["tensor"], rows * cols)
        total = 0
        for tensor, n in sizes.items():
            starts[tensor] = total
            total += -(-n // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
        slots = slots_from_manifest(manifest, export_dir, lambda w: (starts[w["tensor"]], None))
        flat = np.zeros(total, np.float32)
        done = set()
        for slot in slots.values():
            if slot.patchable and slot.start not in done:
                done.add(slot.start)
                n = slot.tensor_size
                try:
                    flat[slot.start: slot.start + n] = np.fromfile(slot.file, "<f4", n, offset=slot.offset)
                except (OSError, ValueError) as exc:
                    raise FileNotFoundError(f"{slot.file}: cannot read {slot.name} ({n * 4} bytes at offset "
                                            f"{slot.offset}): {exc}; re-export {export_dir}") from None
        return slots, flat

    def _session(self, prepack: bool):
        owner = self._owner
        so = owner.options(prepack)
        for name, value in self._ortvalues.items():
            so.add_initializer(name, value)
        return owner._ort.InferenceSession(str(owner.model_path), so, providers=["CPUExecutionProvider"])

    def _build_loop(self) -> None:
        """Background: whenever the packed session is older than the weights, build one from the live buffers."""
        while True:
            with self._state:
                while not self._closed and (self._complete != self._generation or
                                            (self._packed is not None and self._packed[0] == self._generation) or
                                            self._failed_at == self._generation):
                    self._state.wait()
                if self._closed:
                    return
                generation = self._generation
                retired, self._retired = self._retired, None
            del retired     # the stale packed session, freed here before its successor is packed
            release_freed_memory()
            # Built without the lock: a switch during the build bumps the generation and the result is dropped,
            # since it may have read half-written buffers.
            try:
                session = self._session(prepack=True)
            except Exception as exc:   # reported; the direct session keeps serving, the next switch retries
                with self._state:
                    self.build_error, self._failed_at = f"{type(exc).__name__}: {exc}", generation
                    self._state.notify_all()
                warnings.warn(f"{self._owner.dir}: rebuilding the packed session failed ({exc}); runs stay on the "
                              f"unpacked session until the next switch", PackedPathWarning, stacklevel=1)
                continue
            with self._state:
                if generation == self._generation:
                    self._packed = (generation, session)
                    self.build_error = None
                    self._state.notify_all()
            del session     # or this frame keeps it (and its prepacked copy) alive until the next build

    _failed_at = -1

    def weights_changed(self) -> None:
        with self._state:
            self._generation += 1
            # Freeing a prepacked copy takes tens of ms: leave it to the builder (or the rebuild), off this path.
            self._retired, self._packed = self._packed, None

    def after_scatter(self) -> None:
        """The buffers are whole again. "packed": rebuild now (runs wait on the runtime's lock meanwhile); the old
        packed session is kept until the new one exists, so a failed rebuild can be undone."""
        session = self._session(prepack=True) if self.policy == "packed" else None
        with self._state:
            self._complete = self._generation
            if session is not None:
                self._packed, self._retired = (self._generation, session), None
            self._state.notify_all()
        if session is not None:
            del session
            release_freed_memory()

    def weights_reverted(self) -> None:
        """The runtime wrote the previous state back: the previous packed session is valid again."""
        with self._state:
            self._complete = self._generation
            if self._retired is not None:
                self._packed, self._retired = (self._generation, self._retired[1]), None
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
        """Block until runs go at full speed; False after `timeout`, or at once if this state's rebuild failed."""
        with self._state:
            self._state.wait_for(lambda: self.ready or self._closed or self._failed_at == self._generation, timeout)
            return self.ready

    def close(self) -> None:
        with self._state:
            self._closed = True
            self._state.notify_all()
        builder, self._builder = self._builder, None
        if builder is not None and builder is not threading.current_thread():
            builder.join()   # a build in flight finishes first: ORT must not be inside a session at exit
        self._packed = self._retired = self._direct = None
        _OPEN.discard(self)


# Backends with a builder thread: closed (thread joined) at interpreter exit, before the C++ runtime is torn down
# under a thread still inside ORT (which aborted the process: "terminate called without an active exception").
_OPEN: "weakref.WeakSet[RebuildSessions]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for sessions in list(_OPEN):
        sessions.close()
