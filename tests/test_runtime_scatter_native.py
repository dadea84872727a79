"""The native scatter kernel (native/scatter.c): bit-identical to numpy, and a clean fallback where it cannot be
built. Speed is measured in benchmarks (docs/runtime.md), never here."""

import numpy as np
import pytest

from shira_edge.runtime import native_build, scatter


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """scatter's process-wide kernel choice, reset for one test and restored after it."""
    monkeypatch.setenv("SHIRA_EDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(scatter, "_native", None)
    return monkeypatch


@pytest.mark.parametrize("n", [0, 1, 64, 65, 200_000], ids=lambda n: f"{n}-positions")
@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
def test_native_scatter_writes_exactly_what_numpy_writes(fresh_kernel, n, threads):
    assert scatter.kernel() == "native"
    rng = np.random.default_rng(n)
    base = rng.standard_normal(1 << 20).astype(np.float32)
    positions = np.sort(rng.choice(base.size, n, replace=False)).astype(np.int64)
    values = rng.standard_normal(n).astype(np.float32)
    values[:3] = [np.nan, -0.0, np.inf][:min(3, n)]   # bit patterns, not just values
    want, got = base.copy(), base.copy()
    want[positions] = values
    scatter.check_plan(got, positions, values)
    scatter.scatter_into(got, positions, values, threads=threads)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_a_kernel_that_cannot_be_built_falls_back_to_numpy_and_says_so(fresh_kernel, tmp_path):
    broken = tmp_path / "scatter.c"
    broken.write_text("this is not C\n")
    fresh_kernel.setattr(scatter, "SOURCE", broken)
    with pytest.warns(RuntimeWarning, match="native scatter kernel is unavailable.*scatter.c with gcc failed"):
        assert scatter.kernel() == "numpy"
    flat = np.zeros(8, np.float32)
    scatter.scatter_into(flat, np.array([2, 7], np.int64), np.array([1.5, -2.0], np.float32))
    assert flat.tolist() == [0, 0, 1.5, 0, 0, 0, 0, -2.0]


def test_a_kernel_that_writes_wrong_values_is_refused(fresh_kernel, tmp_path):
    wrong = tmp_path / "scatter.c"
    wrong.write_text(scatter.SOURCE.read_text().replace("flat[pos[i]] = vals[i];", "flat[pos[i]] = vals[i] + 1;"))
    fresh_kernel.setattr(scatter, "SOURCE", wrong)
    with pytest.warns(RuntimeWarning, match="differ from numpy's on a test pattern"):
        assert scatter.kernel() == "numpy"


def test_numpy_can_be_asked_for(fresh_kernel):
    fresh_kernel.setenv("SHIRA_EDGE_SCATTER", "numpy")
    assert scatter.kernel() == "numpy"


def test_non_contiguous_inputs_are_refused_by_check_plan():
    flat = np.zeros(16, np.float32)
    positions = np.arange(0, 8, dtype=np.int64)[::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        scatter.check_plan(flat, positions, np.ones(4, np.float32))


def test_native_build_errors_name_the_cache_to_fix(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SHIRA_EDGE_CACHE", str(blocker))   # a file where the cache directory should be
    path = native_build.library_path(scatter.SOURCE, "libshira_scatter", scatter._command)
    with pytest.raises(native_build.NativeUnavailable, match="set SHIRA_EDGE_CACHE to a writable directory"):
        native_build.build(path, scatter.SOURCE, scatter._command)
