"""Patch plans without an export: index mapping into buffer layouts, and fusion arithmetic in PEFT's order."""

from __future__ import annotations

import numpy as np
import pytest

from shira_edge.runtime.patch import PreparedAdapter, Slot, Target, buffer_order, buffer_positions, compose


def _slot(tmp_path, layout, out=6, inp=5, start=7, seed=0):
    base = np.random.default_rng(seed).standard_normal((out, inp)).astype(np.float32)
    stored = base if layout == "as_is" else base.T
    path = tmp_path / f"{layout}.bin"
    path.write_bytes(b"\0" * 12 + np.ascontiguousarray(stored).tobytes())
    return Slot("w", out, inp, layout, start, path, 12, "", True), base


@pytest.mark.parametrize("layout", ["as_is", "transposed"])
def test_positions_address_the_same_element_in_the_buffer(tmp_path, layout):
    slot, base = _slot(tmp_path, layout)
    idx = np.array([0, 3, 7, 12, 29])
    flat = np.zeros(slot.start + base.size, np.float32)
    stored = base if layout == "as_is" else base.T
    flat[slot.start:] = stored.reshape(-1)
    pos = buffer_positions(slot, idx)
    assert np.array_equal(flat[pos], base.reshape(-1)[idx])
    order = buffer_order(slot, idx)
    sorted_pos = pos if order is None else pos[order]
    assert np.all(np.diff(sorted_pos) > 0)


def _adapter(slot, idx, values, name):
    pos = buffer_positions(slot, np.asarray(idx))
    order = buffer_order(slot, np.asarray(idx))
    values = np.asarray(values, np.float32)
    if order is not None:
        pos, values = pos[order], values[order]
    return PreparedAdapter(name, name, (Target(slot, pos, values, 1.0),))


@pytest.mark.parametrize("layout", ["as_is", "transposed"])
def test_fusion_adds_in_the_given_order_in_float32(tmp_path, layout):
    slot, base = _slot(tmp_path, layout)
    a = _adapter(slot, [1, 4, 9], [1e-3, 0.5, -2.0], "a")
    b = _adapter(slot, [4, 9, 20], [3e-8, 0.25, 7.0], "b")
    plan = compose([(a, 1.0), (b, 0.5)])
    expected = base.reshape(-1).copy()
    for adapter, scale in ((a, 1.0), (b, 0.5)):
        for t in adapter.targets:
            rows_cols = t.positions - slot.start
            if layout == "transposed":
                rows_cols = (rows_cols % slot.out) * slot.inp + rows_cols // slot.out
            expected[rows_cols] = expected[rows_cols] + t.values * np.float32(scale)
    got = dict(zip(plan.positions.tolist(), plan.values.tolist()))
    flat_expected = expected.reshape(base.shape)
    for p, v in got.items():
        local = p - slot.start
        r, c = (divmod(local, slot.inp) if layout == "as_is" else (local % slot.out, local // slot.out))
        assert np.float32(v) == flat_expected[r, c]
    assert len(got) == 4 and plan.active == (("a", 1.0), ("b", 0.5))
    restore = dict(zip(plan.positions.tolist(), plan.base.tolist()))
    stored = (base if layout == "as_is" else base.T).reshape(-1)
    assert all(np.float32(v) == stored[p - slot.start] for p, v in restore.items())
