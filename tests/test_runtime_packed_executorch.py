"""The ExecuTorch packed-in-place switch (runtime/et_packed.py), its fallback to reloading (runtime/
executorch_backend.py ReloadProgram), the native runner (runtime/et_native.py) and the executorch pin (runtime/
et_compat.py), on the tiny OPT export (the `exports` fixture of tests/test_runtime_switch.py). References are fresh
loads of the export with the patched weights written into its .ptd."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from shira_edge.bench.adapters import random_shira
from shira_edge.runtime import Runtime, et_compat, et_native, et_packed, executorch_backend
from shira_edge.runtime.et_packed import XnnpackPackedFC
from shira_edge.runtime.manifest import read_manifest
from shira_edge.runtime.onnx_backend import PackedPathWarning
from shira_edge.runtime.shira_format import write_shira
from tests.test_runtime_switch import exports  # noqa: F401  (the session's tiny exports)

IDS = np.array([[2, 45, 9, 301, 77, 5, 130, 12]])
FUSE_SCALES = [1.0, 0.5]


@pytest.fixture(scope="module")
def et_dir(exports):
    return exports["executorch"]


@pytest.fixture(scope="module")
def shiras(et_dir, tmp_path_factory):
    root, weights = tmp_path_factory.mktemp("packed-et-adapters"), read_manifest(et_dir)["weights"]
    patchable = [w for w in weights if w["patchable"]]
    return {name: write_shira(root / f"{name}.shira", random_shira(name, patchable, None, seed, density=0.05))
            for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def packed(et_dir):
    with Runtime(et_dir) as rt:
        yield rt


def _with_weights(et_dir, rt, out):
    """A copy of the export whose .ptd holds the runtime's live weights (the "patch the .ptd" reference)."""
    manifest = read_manifest(et_dir)
    out.mkdir()
    for f in et_dir.iterdir():
        shutil.copy(f, out / f.name)
    ptd = bytearray((out / "model.ptd").read_bytes())
    for w in manifest["weights"]:
        if w["patchable"]:
            ptd[w["offset"]: w["offset"] + w["nbytes"]] = rt.weight(w["name"]).astype("<f4").tobytes()
    (out / "model.ptd").write_bytes(bytes(ptd))
    return out


def _fresh_logits(export_dir, ids=IDS):
    """Logits of a plain load of the files (XNNPACK packs them afresh on its heap, no cache file)."""
    vocab = read_manifest(export_dir)["io"]["vocab_size"]
    program = et_native.NativeProgram(et_native.library(), export_dir / "model.pte", export_dir / "model.ptd",
                                      cache_path="", vocab=vocab)
    try:
        return program.forward(ids[0], 0)
    finally:
        program.close()


# ---------------------------------------------------------------- the packed path


def test_packed_path_runs_here(packed):
    assert packed.switch_path == "packed-in-place"
    assert packed.switch_fallback_reason is None
    slots = [s for s in packed._backend.slots.values() if s.patchable]
    assert slots and all(isinstance(s.packing, XnnpackPackedFC) for s in slots)


def test_cache_goes_into_the_pack_dir_when_one_is_named(et_dir, shiras, tmp_path, monkeypatch):
    # SHIRA_EDGE_PACK_DIR names the tmpfs (one mounted huge=always, say): the cache is an unnamed file there.
    monkeypatch.setenv("SHIRA_EDGE_PACK_DIR", "/dev/shm")
    with Runtime(et_dir) as rt:
        assert rt.switch_path == "packed-in-place"
        target = os.readlink(f"/proc/self/fd/{rt._backend._program._fd}")
        assert target.startswith(str(Path("/dev/shm").resolve()) + "/") and "(deleted)" in target
        rt.switch(shiras["a"])
        assert np.array_equal(rt.run(IDS), _fresh_logits(_with_weights(et_dir, rt, tmp_path / "patched")))
    monkeypatch.setenv("SHIRA_EDGE_PACK_DIR", str(tmp_path))   # on disk: refused, and the reload path runs
    with pytest.warns(PackedPathWarning, match="SHIRA_EDGE_PACK_DIR.*no writable tmpfs"):
        with Runtime(et_dir) as rt:
            assert rt.switch_path == "reload"
    monkeypatch.delenv("SHIRA_EDGE_PACK_DIR")
    with Runtime(et_dir) as rt:
        assert os.readlink(f"/proc/self/fd/{rt._backend._program._fd}").startswith("/memfd:")


@pytest.mark.parametrize("state", ["a", "fused", "restored"])
def test_first_run_after_switch_equals_a_fresh_load_of_the_patched_ptd(packed, shiras, et_dir, tmp_path, state):
    a, b = shiras["a"], shiras["b"]
    pristine = packed._backend.flat.tobytes()
    if state == "a":
        packed.switch(a)
    elif state == "fused":
        packed.switch([a, b], scales=FUSE_SCALES)
    else:
        for s in (a, b, [a, b]):
            packed.switch(s)
        packed.switch(None)
    try:
        first = packed.run(IDS)                                 # the first run after the switch
        reference = _with_weights(et_dir, packed, tmp_path / "patched")
        assert np.array_equal(first, _fresh_logits(reference))
        if state == "restored":                                 # back to the export itself, bit for bit
            assert packed._backend.flat.tobytes() == pristine
            assert np.array_equal(first, _fresh_logits(et_dir))
        else:
            assert not np.array_equal(first, _fresh_logits(et_dir))
    finally:
        packed.switch(None)


def test_packed_runtime_never_imports_torch(et_dir):
    code = textwrap.dedent(f"""
        import sys
        from shira_edge.runtime import Runtime
        rt = Runtime({str(et_dir)!r})
        rt.run([[2, 3, 4]])
        assert rt.switch_path == "packed-in-place", rt.switch_fallback_reason
        assert "torch" not in sys.modules, "torch was imported"
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------- fallback


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(executorch_backend, "_SAID", set())   # each test sees its warning, said once


def test_failed_self_test_falls_back_to_reloading_and_never_sees_a_patched_cache(packed, shiras, et_dir,
                                                                                monkeypatch, fresh_warnings):
    from shira_edge.runtime import backend

    monkeypatch.setattr(backend, "SELF_TEST_FACTOR", np.float32(1.0))   # the patch cannot move the output
    with pytest.warns(PackedPathWarning, match="did not change the output.*falling back to reloading"):
        rt = Runtime(et_dir)
    with rt:
        assert rt.switch_path == "reload" and "did not change the output" in rt.switch_fallback_reason
        packed.switch(shiras["a"])                 # a packed runtime of the same export, patched, in this process
        try:
            assert np.array_equal(rt.run(IDS), _fresh_logits(et_dir))
            rt.switch(shiras["a"])
            assert np.array_equal(rt.run(IDS), packed.run(IDS))
            rt.switch(None)
            assert np.array_equal(rt.run(IDS), _fresh_logits(et_dir))
        finally:
            packed.switch(None)


def test_one_weight_computed_from_a_private_copy_fails_the_self_test(et_dir, monkeypatch, fresh_warnings):
    # What XNNPACK repacking one weight on its heap would look like: writes into that weight's block in the cache
    # file no longer reach the kernels. The other weights stay live, so only a test of that tensor can see it.
    real = et_packed.live_patch_self_test
    seen = {}

    class OneDeadBlock:
        def __init__(self, flat, victim):
            self.flat, self.victim = flat, victim

        def __getitem__(self, key):
            block = self.flat[key]
            return np.array(block) if key.start == self.victim.start else block

    def with_a_dead_block(flat, tensors, probe):
        tensors = list(tensors)
        seen["victim"] = victim = tensors[len(tensors) // 2]
        return real(OneDeadBlock(flat, victim), tensors, probe)

    monkeypatch.setattr(et_packed, "live_patch_self_test", with_a_dead_block)
    with pytest.warns(PackedPathWarning, match="did not change the output") as caught:
        with Runtime(et_dir) as rt:
            assert rt.switch_path == "reload"
    reasons = [str(w.message) for w in caught if issubclass(w.category, PackedPathWarning)]
    assert len(reasons) == 1 and seen["victim"].name in reasons[0]


def test_a_layout_not_found_here_falls_back(et_dir, monkeypatch, fresh_warnings):
    monkeypatch.setattr(et_packed, "NR_CANDIDATES", (8,))   # as if this CPU's kernels packed 8 outputs per block
    with pytest.warns(PackedPathWarning, match="matches no known XNNPACK layout"):
        with Runtime(et_dir) as rt:
            assert rt.switch_path == "reload"


def test_without_a_compiler_the_runtime_falls_back(et_dir, monkeypatch, tmp_path, fresh_warnings):
    monkeypatch.setenv("SHIRA_EDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(et_native, "_LIB", None)
    monkeypatch.setattr(et_native, "build_command", lambda out: ["false"])
    with pytest.warns(PackedPathWarning, match="building shira_et.cpp with false failed"):
        with Runtime(et_dir) as rt:
            assert rt.switch_path == "reload"
    assert not list(tmp_path.rglob("*shira_et*.so*"))     # nothing half-built is left to load


def test_in_place_false_asks_for_the_reload_path(et_dir):
    with Runtime(et_dir, in_place=False) as rt:
        assert rt.switch_path == "reload"


def test_the_thread_pool_is_not_resized_under_loaded_programs(packed, et_dir):
    lib = et_native.library()
    now = lib.shira_et_threads()
    with pytest.raises(ValueError, match="process-wide"):   # resizing would leave `packed` a dangling pool
        Runtime(et_dir, threads=now + 1)
    with Runtime(et_dir, threads=now) as same:              # the size it has: nothing to do
        assert np.array_equal(same.run(IDS), packed.run(IDS))


# ---------------------------------------------------------------- pieces


@pytest.mark.parametrize("k,n,nr", [(3, 5, 4), (32, 64, 32), (7, 33, 16)])
def test_packed_fc_positions_and_elements_are_inverse(k, n, nr):
    p = XnnpackPackedFC(k, n, nr)
    positions = p.positions(np.arange(n * k))
    assert np.unique(positions).size == n * k and positions.max() < p.size
    assert np.array_equal(p.elements(positions), np.arange(n * k))
    assert (p.elements(np.setdiff1d(np.arange(p.size), positions)) == -1).all()   # biases and padding


def test_native_library_is_keyed_by_its_source(monkeypatch, tmp_path):
    monkeypatch.setenv("SHIRA_EDGE_CACHE", str(tmp_path))
    first = et_native.library_path()
    changed = tmp_path / "shira_et.cpp"
    changed.write_text(et_native.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(et_native, "SOURCE", changed)
    assert et_native.library_path() != first and et_native.library_path().parent == tmp_path / "native"


def test_executorch_is_the_pinned_version():
    installed = et_compat.installed_version()
    assert installed == et_compat.EXECUTORCH_VERSION, (
        f"executorch {installed} is installed, but runtime/et_compat.py is pinned to "
        f"{et_compat.EXECUTORCH_VERSION}: re-check its private APIs and XNNPACK's cache format (see its docstring) "
        f"against {installed}'s sources, then move the pin")


def test_module_docstrings_run():
    import doctest

    for module in (et_packed, et_compat):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
