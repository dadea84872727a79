"""The switch kernel: exact writes at precomputed positions, single- and multi-threaded."""

from __future__ import annotations

import numpy as np
import pytest

from shira_edge.runtime.scatter import MIN_PER_THREAD, check_plan, scatter_into


@pytest.mark.parametrize("threads", [1, 2, 4], ids=lambda t: f"threads{t}")
def test_scatter_writes_exactly_the_positions(threads):
    rng = np.random.default_rng(0)
    flat = rng.standard_normal(40 * MIN_PER_THREAD).astype(np.float32)
    before = flat.copy()
    pos = np.sort(rng.choice(flat.size, 5 * MIN_PER_THREAD, replace=False)).astype(np.int64)
    val = rng.standard_normal(pos.size).astype(np.float32)
    scatter_into(flat, pos, val, threads=threads)
    assert np.array_equal(flat[pos], val)
    untouched = np.ones(flat.size, bool)
    untouched[pos] = False
    assert np.array_equal(flat[untouched], before[untouched])
    scatter_into(flat, pos, before[pos], threads=threads)   # restore = scatter the saved values
    assert flat.tobytes() == before.tobytes()


@pytest.mark.parametrize("bad,match", [
    (dict(positions=np.array([3, 1], np.int64)), "strictly increasing"),
    (dict(positions=np.array([1, 8], np.int64)), "strictly increasing within"),
    (dict(values=np.array([1, 2], np.float64)), "float32"),
    (dict(flat=np.zeros(8, np.float64)), "float32"),
], ids=["unsorted", "out-of-range", "float64-values", "float64-target"])
def test_check_plan_rejects(bad, match):
    args = dict(flat=np.zeros(8, np.float32), positions=np.array([1, 3], np.int64),
                values=np.array([1, 2], np.float32)) | bad
    with pytest.raises(ValueError, match=match):
        check_plan(**args)
