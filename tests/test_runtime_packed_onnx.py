"""The packed-in-place ONNX switch (runtime/onnx_packed.py), its fallback (runtime/onnx_backend.py RebuildSessions),
the weight-map mapping (runtime/layout.py) and the slot builder (runtime/backend.py), on the tiny OPT export."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from shira_edge.runtime import Runtime
from shira_edge.runtime import onnx_packed
from shira_edge.runtime.backend import SlotError, slots_from_manifest
from shira_edge.runtime.layout import MlasPackedB, TablePacking, buffer_positions, file_elements
from shira_edge.runtime.onnx_backend import PackedPathWarning, RebuildSessions
from shira_edge.runtime.patch import Slot
from shira_edge.runtime.shira_format import make_adapter, make_target, write_shira

IDS = np.array([[2, 45, 9, 301, 77, 5, 130, 12]])


@pytest.fixture(scope="session")
def onnx_dir(tiny_exports):
    """The tiny OPT (seed 0) through the real ONNX exporter: the session's shared export (tests/conftest.py)."""
    return tiny_exports["onnx"]


def _random_adapter(path, manifest, seed, density=0.05):
    rng = np.random.default_rng(seed)
    targets = []
    for w in manifest["weights"]:
        if w["patchable"]:
            n = w["shape"][0] * w["shape"][1]
            idx = np.sort(rng.choice(n, max(1, int(n * density)), replace=False))
            targets.append(make_target(w["name"], w["shape"], idx, rng.standard_normal(idx.size).astype(np.float32)
                                       * 0.5, base_digest=w["digest"]))
    write_shira(path, make_adapter(path.stem, targets))
    return path


@pytest.fixture(scope="session")
def shiras(onnx_dir, tmp_path_factory):
    from shira_edge.runtime.manifest import read_manifest

    root, manifest = tmp_path_factory.mktemp("packed-adapters"), read_manifest(onnx_dir)
    return {name: _random_adapter(root / f"{name}.shira", manifest, seed) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="session")
def packed(onnx_dir):
    rt = Runtime(onnx_dir, threads=1)
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def rebuilt(onnx_dir):
    """Reference: a fresh prepacked session built over the patched weights after every switch."""
    rt = Runtime(onnx_dir, threads=1, policy="packed", in_place=False)
    yield rt
    rt.close()


@pytest.fixture
def rt(packed):
    packed.switch(None)
    yield packed
    packed.switch(None)


# ---------------------------------------------------------------- the packed-in-place path


def test_runs_packed_in_place_with_layouts_probed_here(rt):
    assert rt.switch_path == "packed-in-place" and rt.switch_fallback_reason is None and rt.ready
    impl = rt._backend._impl
    assert set(impl.layouts) == {(32, 32), (32, 64), (64, 32)}
    if platform.machine() in ("x86_64", "AMD64"):   # the closed form, cross-checked by the probe
        assert all(closed for _, closed in impl.layouts.values())
    assert impl.freed_bytes > 0                     # the unpacked originals were released
    assert not list(onnx_packed.pack_dir().glob(f"{onnx_packed.PREFIX}{os.getpid()}-*"))   # nothing on disk


def test_first_run_after_switch_equals_a_fresh_packed_session(rt, rebuilt, shiras):
    for state in (shiras["a"], [shiras["a"], shiras["b"]], shiras["b"]):
        rt.switch(state, None if not isinstance(state, list) else [1.0, 0.5])
        first = rt.run(IDS)
        rebuilt.switch(state, None if not isinstance(state, list) else [1.0, 0.5])
        assert first.tobytes() == rebuilt.run(IDS).tobytes()
    rebuilt.switch(None)


def test_weights_read_back_through_the_packed_layout(rt, rebuilt, shiras):
    rt.switch(shiras["a"])
    rebuilt.switch(shiras["a"])
    for name, slot in rt._backend.slots.items():
        if slot.patchable:
            assert rt.weight(name).tobytes() == rebuilt.weight(name).tobytes(), name
    rebuilt.switch(None)


def test_restore_a_b_fused_none_is_bit_exact(rt, shiras):
    base_bytes, base_logits = rt._backend.flat.tobytes(), rt.run(IDS)
    rt.switch(shiras["a"])
    moved = rt.run(IDS)
    rt.switch(shiras["b"])
    rt.switch([shiras["a"], shiras["b"]], scales=[0.7, 1.3])
    assert rt._backend.flat.tobytes() != base_bytes
    rt.switch(None)
    assert rt._backend.flat.tobytes() == base_bytes
    assert rt.run(IDS).tobytes() == base_logits.tobytes()
    assert not np.allclose(moved, base_logits, atol=1e-3)


def test_generate_matches_step_by_step_forwards(rt, shiras):
    rt.switch(shiras["b"])
    tokens = rt.generate(IDS[:, :4], max_new_tokens=5, eos_token_id=None)
    seq = IDS[:, :4]
    for _ in range(5):
        seq = np.concatenate([seq, rt.run(seq)[:, -1].argmax(-1)[:, None]], axis=1)
    assert np.array_equal(tokens, seq)


def test_pack_cache_holds_the_export_and_one_packed_blob_per_matmul_weight(onnx_dir, tmp_path):
    import onnxruntime as ort

    from shira_edge.runtime import onnx_proto

    export = (onnx_dir / "model.onnx").read_bytes()
    model, data = onnx_packed.write_pack_cache(ort, onnx_dir / "model.onnx", ort.SessionOptions, tmp_path, "pack",
                                               chunk_bytes=1)   # one weight per chunk: the chunking is exercised
    source = {i.name: i for i in onnx_proto.initializers(export)}
    weights = onnx_proto.matmul_weights(export)
    assert weights and sorted(p.name for p in tmp_path.iterdir()) == ["pack", "pack.onnx"]
    moved_all = [i for i in onnx_proto.initializers(model.read_bytes()) if i.external]
    assert {i.name for i in moved_all} == {i.name for i in source.values() if i.external} | weights
    for init in moved_all:
        assert init.external["location"] == "pack"
        moved = np.fromfile(data, "<u4", int(init.external["length"]) // 4, offset=int(init.external["offset"]))
        was = source[init.name]
        raw = np.fromfile(onnx_dir / was.external["location"], "<u4", moved.size, offset=int(was.external["offset"]))
        assert np.array_equal(moved, raw), init.name
        assert [b[0] for b in init.prepacked()] == (["MatMul"] if init.name in weights else [])


@pytest.mark.parametrize("location, offset, match", [
    ("../model.onnx.data", 0, "not a file of the export"),
    ("/etc/passwd", 0, "not a file of the export"),
    ("model.onnx.data", 1 << 40, "lies outside"),
], ids=["escapes-the-dir", "absolute", "past-the-end"])
def test_pack_cache_refuses_external_data_outside_the_export(onnx_dir, tmp_path, location, offset, match):
    import onnxruntime as ort

    from shira_edge.runtime import onnx_proto

    export = (onnx_dir / "model.onnx").read_bytes()
    name = sorted(onnx_proto.matmul_weights(export))[0]
    bad = tmp_path / "export"
    bad.mkdir()
    hostile = onnx_proto.with_external_data(export, {name: [("location", location), ("offset", str(offset)),
                                                            ("length", "16")]})
    (bad / "model.onnx").write_bytes(hostile)
    shutil.copy(onnx_dir / "model.onnx.data", bad / "model.onnx.data")
    with pytest.raises(onnx_packed.PackedPathUnavailable, match=f"{name}.*{match}"):
        onnx_packed.write_pack_cache(ort, bad / "model.onnx", ort.SessionOptions, tmp_path, "pack")


def test_a_weight_served_from_a_private_copy_fails_the_self_test(onnx_dir, monkeypatch):
    # A blob filed under a key the kernel does not ask for is what a graph rewrite at load would cause: ORT packs
    # that weight privately, the blob in the file is dead, and patches to it would be silently lost.
    from shira_edge.runtime import onnx_proto

    real = onnx_packed.write_pack_cache
    weights = onnx_proto.matmul_weights((onnx_dir / "model.onnx").read_bytes())
    victim = next(n for n in sorted(weights) if ".layers.1." in n and "fc2" in n)

    def wrong_key(ort, export_model, make_options, out_dir, data_name, **kw):
        model, data = real(ort, export_model, make_options, out_dir, data_name, **kw)
        init = next(i for i in onnx_proto.initializers(model.read_bytes()) if i.name == victim)
        entries = [(k, v if not k.startswith("prepacked") else "MatMul+1|" + v.partition("|")[2])
                   for k, v in init.external.items()]
        model.write_bytes(onnx_proto.with_external_data(model.read_bytes(), {victim: entries}))
        return model, data

    monkeypatch.setattr(onnx_packed, "write_pack_cache", wrong_key)
    with pytest.warns(PackedPathWarning, match="did not change the output") as caught:
        with Runtime(onnx_dir, threads=1) as fallback:
            assert fallback.switch_path == "rebuild"
    reasons = [str(w.message) for w in caught if issubclass(w.category, PackedPathWarning)]
    assert len(reasons) == 1 and victim.removesuffix("_t") in reasons[0]   # the slot name: the PyTorch weight


def test_self_test_covers_every_layer_and_every_role():
    from shira_edge.runtime.backend import self_test_tensors

    names = [f"m.layers.{layer}.{role}" for layer in range(6) for role in ("q", "k", "v", "fc")]
    chosen = [s.name for s in self_test_tensors(Slot(n, 2, 2, "as_is", i, None, 0, "", True)
                                                for i, n in enumerate(names))]
    assert chosen[:8] == names[:4] + names[-4:]   # first and last layer: all of them
    middle = chosen[8:]
    assert [n.split(".")[2] for n in middle] == ["1", "2", "3", "4"]
    assert [n.split(".")[3] for n in middle] == ["q", "k", "v", "fc"]
    plain = [Slot(n, 2, 2, "as_is", i, None, 0, "", True) for i, n in enumerate(["lm_head", "a", "b"])]
    assert len(self_test_tensors(plain)) == 3   # no layer numbers: all


# ---------------------------------------------------------------- fallback


def test_failed_self_test_falls_back_to_rebuilding(onnx_dir, rt, shiras, monkeypatch):
    real = onnx_packed.PackedInPlace.self_test

    def patch_a_private_copy(self, logits_of, ids):
        # What an ORT build that copies its packed weights would do: our writes no longer reach the kernels.
        self.flat = np.array(self.flat)
        return real(self, logits_of, ids)

    monkeypatch.setattr(onnx_packed.PackedInPlace, "self_test", patch_a_private_copy)
    with pytest.warns(PackedPathWarning, match="did not change the output"):
        fallback = Runtime(onnx_dir, threads=1)
    with fallback:
        assert fallback.switch_path == "rebuild" and "self-test" in fallback.switch_fallback_reason
        fallback.switch(shiras["a"])
        assert fallback.wait_ready(timeout=60)
        rt.switch(shiras["a"])
        assert fallback.run(IDS).tobytes() == rt.run(IDS).tobytes()
        fallback.switch(None)
        assert fallback.wait_ready(timeout=60)
        rt.switch(None)
        assert fallback.run(IDS).tobytes() == rt.run(IDS).tobytes()


def test_a_wrong_layout_is_caught_before_any_switch(onnx_dir, monkeypatch):
    def identity(ort, k, n, make_options, workdir):
        return TablePacking(np.arange(k * n), MlasPackedB(k, n).size), False

    monkeypatch.setattr(onnx_packed, "probe_layout", identity)
    with pytest.warns(PackedPathWarning, match="do not match the layout"):
        with Runtime(onnx_dir, threads=1) as fallback:
            assert fallback.switch_path == "rebuild"


def test_failed_rebuild_leaves_the_runtime_as_it_was(onnx_dir, shiras, monkeypatch):
    with Runtime(onnx_dir, threads=1, policy="packed", in_place=False) as rt:
        rt.switch(shiras["a"])
        before, logits = rt._backend.flat.tobytes(), rt.run(IDS)
        monkeypatch.setattr(RebuildSessions, "_session", lambda self, prepack: (_ for _ in ()).throw(
            MemoryError("no memory for the packed copy")))
        with pytest.raises(MemoryError):
            rt.switch(shiras["b"])
        assert rt.active == (("a", 1.0),)
        assert rt._backend.flat.tobytes() == before
        assert rt.ready and rt.run(IDS).tobytes() == logits.tobytes()


def test_failed_background_rebuild_keeps_the_builder_alive(onnx_dir, shiras, monkeypatch):
    with Runtime(onnx_dir, threads=1, policy="auto", in_place=False) as rt:
        assert rt.wait_ready(timeout=60)
        real, calls = RebuildSessions._session, []

        def fail_once(self, prepack):
            calls.append(prepack)
            if prepack and len(calls) == 1:
                raise MemoryError("no memory for the packed copy")
            return real(self, prepack)

        monkeypatch.setattr(RebuildSessions, "_session", fail_once)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PackedPathWarning)
            rt.switch(shiras["a"])
            assert not rt.wait_ready(timeout=60)            # this state's build failed: reported, not hung
            assert "no memory" in rt._backend._impl.build_error
            direct = rt.run(IDS)                             # the unpacked session serves meanwhile
            rt.switch(shiras["b"])
            rt.switch(shiras["a"])
            assert rt.wait_ready(timeout=60) and rt._backend._impl._builder.is_alive()
            np.testing.assert_allclose(rt.run(IDS), direct, atol=1e-5, rtol=0)


SCRIPT = """
import sys
from shira_edge.runtime import Runtime
rt = Runtime(sys.argv[1], threads=1, policy=sys.argv[3], in_place=sys.argv[4] == "1")
rt.switch(sys.argv[2])
rt.run([[2, 3, 4]])
"""   # and exit right away, with a background rebuild in flight under "auto"


@pytest.mark.parametrize("policy,in_place", [("auto", "0"), ("auto", "1"), ("packed", "0")])
def test_a_program_that_switches_and_exits_exits_cleanly(onnx_dir, shiras, policy, in_place):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(SCRIPT), str(onnx_dir), str(shiras["a"]),
                               policy, in_place], stderr=subprocess.PIPE, env=env) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-500:]


KILLED = """
import os, signal, sys
from shira_edge.runtime import Runtime
rt = Runtime(sys.argv[1], threads=1)
rt.switch(sys.argv[2])
print(os.getpid(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)   # dies with the adapter live in its pack cache
"""


def test_a_runtime_killed_mid_adapter_leaves_nothing_and_the_next_start_is_the_base(onnx_dir, rt, shiras):
    proc = subprocess.run([sys.executable, "-c", KILLED, str(onnx_dir), str(shiras["a"])], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == -9, proc.stderr[-500:]
    pid, root = int(proc.stdout.split()[0]), onnx_packed.pack_dir()
    assert not list(root.glob(f"{onnx_packed.PREFIX}{pid}-*"))        # unlinked right after start-up
    stale = root / f"{onnx_packed.PREFIX}{pid}-left-by-a-crash"      # as if it had died during start-up
    stale.mkdir()
    (stale / "model.pack").write_bytes(b"patched")
    with Runtime(onnx_dir, threads=1) as fresh:
        assert not stale.exists()
        assert fresh.switch_path == "packed-in-place"
        assert fresh.run(IDS).tobytes() == rt.run(IDS).tobytes()   # the base model, not the killed one's state


# ---------------------------------------------------------------- the weight map (runtime/layout.py)


def _slot(**kw):
    base = dict(name="w", out=2, inp=3, layout="as_is", start=0, file=None, offset=0, digest="", patchable=True)
    return Slot(**{**base, **kw})


def _all(slot):
    return buffer_positions(slot, np.arange(slot.out * slot.inp))


def test_slice_of_a_fused_tensor():
    q, k = _slot(tensor_shape=(5, 3), start=7), _slot(tensor_shape=(5, 3), out_offset=3, start=7)
    assert _all(q).tolist() == [7, 8, 9, 10, 11, 12]
    assert _all(k).tolist() == [16, 17, 18, 19, 20, 21]        # rows 3-4 of T
    t = _slot(layout="transposed", tensor_shape=(3, 5), out_offset=3)   # T = [in, 5 outputs], columns 3-4
    assert _all(t).tolist() == [3, 8, 13, 4, 9, 14]


def test_row_permutation_and_transposed():
    perm = np.array([1, 0])
    assert _all(_slot(row_perm=perm)).tolist() == [3, 4, 5, 0, 1, 2]
    assert _all(_slot(layout="transposed")).tolist() == [0, 2, 4, 1, 3, 5]
    both = _slot(layout="transposed", row_perm=perm, tensor_shape=(3, 4), out_offset=1)
    assert _all(both).tolist() == [2, 6, 10, 1, 5, 9]
    assert file_elements(both, _all(both)).tolist() == _all(both).tolist()


def test_packed_layout_composes_with_slices_and_round_trips():
    packing = MlasPackedB(300, 40)                       # two K blocks (256 + 44 rows), N padded 40 -> 48
    e = np.arange(300 * 40)
    pos = packing.positions(e)
    assert packing.size == 300 * 48 and np.unique(pos).size == e.size and pos.max() < packing.size
    assert np.array_equal(packing.elements(pos), e)
    assert np.count_nonzero(packing.elements(np.arange(packing.size)) < 0) == 300 * 8   # padding
    table = TablePacking(pos, packing.size)              # the same layout as a probed table
    w = _slot(out=20, inp=300, layout="transposed", tensor_shape=(300, 40), out_offset=20, start=1000,
              packing=table)
    p = _all(w)
    rows, cols = np.divmod(np.arange(20 * 300), 300)
    assert np.array_equal(p, 1000 + pos[cols * 40 + 20 + rows])
    assert np.array_equal(file_elements(w, p), cols * 40 + 20 + rows)
    with pytest.raises(ValueError, match="its own offset"):
        TablePacking(np.zeros(4, np.int64), 8)


def test_probe_finds_the_packed_layout_of_an_odd_shape(tmp_path):
    import onnxruntime as ort

    packing, closed = onnx_packed.probe_layout(ort, 300, 40, ort.SessionOptions, tmp_path)
    assert np.unique(packing.positions(np.arange(300 * 40))).size == 300 * 40
    if platform.machine() in ("x86_64", "AMD64"):
        assert closed and isinstance(packing, MlasPackedB)


def test_slots_from_manifest_shares_tensors_and_refuses_bad_maps():
    def entry(name, **kw):
        return {"name": name, "shape": [2, 3], "tensor": "qkv", "layout": "as_is", "file": "d", "offset": 0,
                "digest": "", "patchable": True, "tensor_shape": [4, 3], **kw}

    calls = []
    slots = slots_from_manifest({"weights": [entry("q"), entry("k", out_offset=2, row_perm=[1, 0])]}, ".",
                                lambda w: calls.append(w["tensor"]) or (8, None))
    assert calls == ["qkv"] and slots["k"].start == 8
    assert _all(slots["k"]).tolist() == [17, 18, 19, 14, 15, 16]
    with pytest.raises(SlotError, match="overlap"):
        slots_from_manifest({"weights": [entry("q"), entry("k", out_offset=1)]}, ".", lambda w: (0, None))
    with pytest.raises(SlotError, match="row_perm"):
        slots_from_manifest({"weights": [entry("q", row_perm=[0, 0])]}, ".", lambda w: (0, None))
    with pytest.raises(SlotError, match="does not fit"):
        slots_from_manifest({"weights": [entry("q", out_offset=3)]}, ".", lambda w: (0, None))
