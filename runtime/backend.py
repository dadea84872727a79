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

    >>> m = {"weights": [{"name": "q", "shape": [2, 3], "tensor": "qkv", "layout": "as_is", "file": "d",
    ...       "offset": 0, "digest": "", "patchable": True, "tensor_shape": [4, 3]},
    ...      {"name": "k", "shape": [2, 3], "tensor": "qkv", "layout": "as_is", "file": "d", "offset": 0,
    ...       "digest": "", "patchable": True, "tensor_shape": [4, 3], "out_offset": 2}]}
    >>> slots = slots_from_manifest(m, ".", lambda entry: (64, None))
    >>> [(s.start, s.out_offset) for s in slots.values()]
    [(64, 0), (64, 2)]
"""

from __future__ import annotations

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
