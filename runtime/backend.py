"""The contract between `Runtime` and a backend (ONNX Runtime, ExecuTorch), and the one way to build its Slots.

A backend owns the model and one writable 1-D float32 buffer `flat` that holds every patchable weight, in whatever
layout the runtime computes from (plain, or packed). `Runtime` maps adapters into positions of `flat` through the
backend's `slots` (runtime/layout.py does the mapping), scatters under its write lock, and tells the backend:

    backend.weights_changed()      # under the write lock, before the first write into flat
    scatter(...)                   # runtime/scatter.py
    backend.after_scatter()        # after the last write; may raise (e.g. a failed rebuild) ...
    backend.weights_reverted()     # ... then the runtime writes the old values back and calls this instead

A switch either completes or leaves the weights and the backend as they were. Runs (`step`, `forward`) happen under
the read lock, so a backend never sees a run and a write at once.

Building slots: `slots_from_manifest(manifest, export_dir, place)` reads every `weights[*]` entry of a validated
manifest (including the optional weight-map keys tensor_shape, out_offset, row_perm) into a `patch.Slot`, and asks
`place(entry) -> (start, packing)` once per distinct backend tensor where that tensor starts in `flat` and how it is
packed there (None: stored as is, row-major `tensor_shape`; else an object with `positions(elements)`,
`elements(offsets)` and `size`, e.g. `layout.TablePacking(table, size)` built from a probe on this machine).
Entries that share a tensor (slices of a fused qkv) share its start and packing.

Proving a packed path live: `live_patch_self_test(flat, tensors, probe)` is the start-up self-test both packed
backends run before they accept a switch (see its docstring).

    >>> m = {"weights": [{"name": "q", "shape": [2, 3], "tensor": "qkv", "layout": "as_is", "file": "d",
    ...       "offset": 0, "digest": "", "patchable": True, "tensor_shape": [4, 3]},
    ...      {"name": "k", "shape": [2, 3], "tensor": "qkv", "layout": "as_is", "file": "d", "offset": 0,
    ...       "digest": "", "patchable": True, "tensor_shape": [4, 3], "out_offset": 2}]}
    >>> slots = slots_from_manifest(m, ".", lambda entry: (64, None))
    >>> [(s.start, s.out_offset) for s in slots.values()]
    [(64, 0), (64, 2)]
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .manifest import tensor_shape
from .patch import Slot


class Backend(Protocol):
    """What `Runtime` needs from a backend. Constructed as Backend(export_dir, manifest, *, policy, threads,
    in_place); in_place=False asks for the backend's fallback path."""

    backend: str                         # "onnxruntime" | "executorch"
    slots: dict[str, Slot]               # PyTorch weight name -> Slot (every manifest weight)
    flat: np.ndarray                     # writable 1-D float32: the buffer slots point into
    batch_limit: int | None              # rows per call (None: any)
    sequence_lock: AbstractContextManager   # held by a whole generation (a backend with one KV cache serialises)
    switch_path: str                     # how a switch reaches the kernels: "packed-in-place", "rebuild", "reload"

    def weights_changed(self) -> None: ...
    def after_scatter(self) -> None: ...
    def weights_reverted(self) -> None: ...

    @property
    def ready(self) -> bool: ...         # runs go at full speed for the live weights

    def wait_ready(self, timeout: float | None = None) -> bool: ...
    def close(self) -> None: ...
    def step(self, input_ids: np.ndarray, cache) -> tuple[np.ndarray, object]: ...
    def forward(self, input_ids: np.ndarray) -> np.ndarray: ...


class SlotError(ValueError):
    """The manifest's weight map is inconsistent (a slice outside its tensor, a bad row_perm)."""


def slots_from_manifest(manifest: dict, export_dir, place: Callable[[dict], tuple[int, object]]) -> dict[str, Slot]:
    """name -> Slot for every `weights[*]` entry; place(entry) is called once per patchable backend tensor."""
    placed: dict[str, tuple[int, object]] = {}
    ranges: dict[str, list] = {}
    slots = {}
    for w in manifest["weights"]:
        out, inp = w["shape"]
        shape = tensor_shape(w)
        out_offset = int(w.get("out_offset") or 0)
        perm = w.get("row_perm")
        perm = None if perm is None else np.asarray(perm, np.int64)
        _check_map(w["name"], w["layout"], out, inp, shape, out_offset, perm)
        for lo, hi, other in ranges.setdefault(w["tensor"], []):
            if out_offset < hi and lo < out_offset + out:
                raise SlotError(f"manifest.json: {w['name']} and {other} overlap in tensor {w['tensor']!r} "
                                f"(outputs {out_offset}..{out_offset + out} and {lo}..{hi}); re-export")
        ranges[w["tensor"]].append((out_offset, out_offset + out, w["name"]))
        start, packing = -1, None
        if w["patchable"]:
            if w["tensor"] not in placed:
                placed[w["tensor"]] = place(w)
            start, packing = placed[w["tensor"]]
        slots[w["name"]] = Slot(w["name"], out, inp, w["layout"], start, Path(export_dir) / w["file"], w["offset"],
                                w["digest"], w["patchable"], shape, out_offset, perm, packing)
    return slots


def _check_map(name, layout, out, inp, shape, out_offset, perm) -> None:
    outputs, inputs = shape if layout == "as_is" else shape[::-1]
    if inputs != inp or not 0 <= out_offset <= outputs - out:
        raise SlotError(f"manifest.json: {name}: shape [{out}, {inp}] at out_offset {out_offset} does not fit in "
                        f"tensor_shape {list(shape)} ({layout}); re-export")
    if perm is not None and (perm.shape != (out,) or not np.array_equal(np.sort(perm), np.arange(out))):
        raise SlotError(f"manifest.json: {name}: row_perm must be a permutation of 0..{out - 1}; re-export")


SELF_TEST_FACTOR = np.float32(2.0)   # each tested tensor is multiplied by this in place, then restored


class SelfTestFailed(RuntimeError):
    """A patch written into `flat` did not reach the kernels, or restoring it did not give the output back."""


def patchable_tensors(slots) -> list:
    """One patchable slot per distinct backend tensor (slices of a fused tensor share its start)."""
    seen: dict[int, object] = {}
    for slot in slots:
        if slot.patchable:
            seen.setdefault(slot.start, slot)
    return list(seen.values())


def self_test_tensors(tensors) -> list:
    """The tensors the self-test patches: every one of the first and the last layer, and one per layer in between,
    its role taken in turn (q, k, v, ...), so every layer and every role is seen. Each test is a forward pass that
    streams all weights (25-50 ms on opt-125m), so testing all 72-210 tensors would add seconds to every start.
    What it guards against is a runtime computing some weight from a private copy (ORT: a graph rewrite at load
    whose kernel looks up another key and packs its own; XNNPACK: a weight repacked on the heap), and runtimes do
    that by pattern: the same role in every layer, with the first and the last layer the ones whose neighbours
    differ. Names without a layer number are all tested."""
    tensors = list(tensors)
    layers: dict[int, list] = {}
    for slot in tensors:
        match = re.search(r"\.(\d+)\.", slot.name)
        layers.setdefault(int(match.group(1)) if match else -1, []).append(slot)
    if -1 in layers or len(layers) <= 2:
        return tensors
    order = sorted(layers)
    chosen = layers[order[0]] + layers[order[-1]]
    for i, layer in enumerate(order[1:-1]):
        chosen.append(layers[layer][i % len(layers[layer])])
    return chosen


def live_patch_self_test(flat: np.ndarray, slots, probe: Callable[[], np.ndarray]) -> None:
    """Multiply each tensor of `self_test_tensors(patchable_tensors(slots))` in place by SELF_TEST_FACTOR: probe() (the output for
    a fixed short input) must move each time, so the runtime computes that tensor from `flat`; restore it. Then the
    output must be bit-identical to before. The whole tensor (slot.start .. + packing.size), because one element or
    one column can sit behind a dead ReLU or sum to nothing after a LayerNorm. Raises SelfTestFailed naming the
    tensor."""
    tensors = patchable_tensors(slots)
    if not tensors:
        raise SelfTestFailed("no patchable weight to test a live patch on")
    base = probe()
    for slot in self_test_tensors(tensors):
        block = flat[slot.start: slot.start + slot.packing.size]
        saved = np.array(block)
        try:
            block *= SELF_TEST_FACTOR
            moved = not np.array_equal(probe(), base)
        finally:
            block[:] = saved
        if not moved:
            raise SelfTestFailed(f"a patch of {slot.name} in the packed weights did not change the output (the "
                                 f"runtime computes it from a private copy)")
    if not np.array_equal(probe(), base):
        raise SelfTestFailed("restoring the patched tensors did not give the base output back bit for bit")
