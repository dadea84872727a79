"""Choosing the next token from the logits: greedy, or sampling with a temperature and top-p, numpy only.

The order is transformers' (temperature, then top-p), and a seed makes a sampled generation repeatable: the same
seed, prompt and adapter state give the same tokens.

    >>> import numpy as np
    >>> logits = np.array([[0.0, 3.0, 1.0, 2.9]], np.float32)
    >>> int(TokenPicker()(logits)[0])                           # temperature 0: greedy
    1
    >>> int(TokenPicker(temperature=1.0, top_p=1e-6, seed=0)(logits)[0])   # only the most likely token survives top-p
    1
    >>> a, b = TokenPicker(temperature=5.0, seed=7), TokenPicker(temperature=5.0, seed=7)
    >>> [int(a(logits)[0]) for _ in range(8)] == [int(b(logits)[0]) for _ in range(8)]
    True
"""

from __future__ import annotations

import math

import numpy as np


def check_sampling(temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> None:
    """ValueError naming the first bad setting (also the CLI's flag check, before anything loads)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: no cut), got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")


class TokenPicker:
    """Called with the last position's logits [batch, vocab]; returns the chosen ids [batch] (int64)."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        check_sampling(temperature, top_p, seed)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.greedy = self.temperature == 0
        self._rng = None if self.greedy else np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.greedy:
            return logits.argmax(-1).astype(np.int64)
        z = logits.astype(np.float64) / self.temperature
        z -= z.max(-1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(-1, keepdims=True)
        if self.top_p < 1:
            # keep the most likely tokens until their mass reaches top_p (the first one always survives)
            order = np.argsort(-probs, axis=-1, kind="stable")
            ranked = np.take_along_axis(probs, order, -1)
            keep_ranked = np.cumsum(ranked, -1) - ranked < self.top_p
            keep = np.zeros_like(keep_ranked)
            np.put_along_axis(keep, order, keep_ranked, -1)
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum(-1, keepdims=True)
        cdf = np.cumsum(probs, -1)
        draw = self._rng.random((probs.shape[0], 1)) * cdf[:, -1:]
        return np.minimum((cdf <= draw).sum(-1), probs.shape[1] - 1).astype(np.int64)
