"""Fingerprints of base weights, shared by the exporter (manifest.json), `pack` (.shira) and the runtime.

A weight's digest is SHA-256 over its float32 values in PyTorch (out, in) layout, row-major, little-endian,
prefixed by its shape, so a digest can only match the same tensor. A model fingerprint is SHA-256 over the
sorted "name|shape|digest" lines of a set of weights, so an adapter's fingerprint covers exactly its targets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np


def weight_digest(weight: np.ndarray) -> str:
    """SHA-256 hex digest of a weight in PyTorch (out, in) layout, taken as float32 little-endian row-major."""
    w = np.ascontiguousarray(np.asarray(weight), dtype="<f4")
    h = hashlib.sha256()
    h.update(("x".join(str(d) for d in w.shape) + ";").encode())
    h.update(memoryview(w).cast("B"))
    return h.hexdigest()


def base_fingerprint(entries: Mapping[str, tuple[Iterable[int], str]]) -> str:
    """Fingerprint of a set of weights: {name: (shape, digest)} -> "sha256:<hex>"."""
    lines = sorted(f"{name}|{'x'.join(str(int(d)) for d in shape)}|{digest}" for name, (shape, digest) in entries.items())
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()
