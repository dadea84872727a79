"""The runtime under hostile or changing input: token ids outside the vocabulary, an adapter rewritten in place,
an export's data file replaced or truncated while a Runtime runs, and programs that switch and simply end."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from shira_edge.runtime import Runtime
from shira_edge.runtime import patch
from shira_edge.runtime.patch import BaseChanged
from shira_edge.runtime.shira_format import encode_shira, make_adapter, make_target, write_shira

BACKENDS = ["onnx", "executorch"]


def _adapter(manifest: dict, values, name: str = "a") -> bytes:
    """A .shira touching three entries of the first patchable weight of an export."""
    w = next(w for w in manifest["weights"] if w["patchable"])
    target = make_target(w["name"], w["shape"], [0, 5, 9], np.float32(values), base_digest=w["digest"])
    return encode_shira(make_adapter(name, [target]))


@pytest.fixture(scope="module")
def runtimes(tiny_exports):
    rts = {b: Runtime(d) for b, d in tiny_exports.items()}
    yield rts
    for rt in rts.values():
        rt.close()


# ------------------------------------------------------------------ token ids


IDS = {"negative": [[2, -1, 7]], "vocab-size": [[2, 512, 7]], "huge": [[2**40]],
       "uint64-max": np.array([[np.iinfo(np.uint64).max]], np.uint64)}
CALLS = {"run": lambda rt, ids: rt.run(ids), "step": lambda rt, ids: rt.step(ids),
         "generate": lambda rt, ids: rt.generate(ids, max_new_tokens=1)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("ids", list(IDS))
def test_token_ids_outside_the_vocabulary_are_refused(runtimes, backend, call, ids):
    bad = np.asarray(IDS[ids])
    worst = int(bad.min()) if bad.min() < 0 else int(bad.max())
    with pytest.raises(ValueError, match=rf"input_ids: token id {worst} is outside this model's vocabulary 0\.\.511"):
        CALLS[call](runtimes[backend], IDS[ids])
    assert CALLS[call](runtimes[backend], [[2, 511, 0]]) is not None   # the edges of the vocabulary are fine


# ------------------------------------------------------------------ the adapter cache


@pytest.mark.parametrize("racy_window", [patch.RACY_S, 0.0], ids=["rehash-recent-files", "memo-by-stat"])
def test_adapter_rewritten_in_place_with_its_mtime_kept_is_read_again(runtimes, tmp_path, monkeypatch, racy_window):
    monkeypatch.setattr(patch, "RACY_S", racy_window)
    rt = runtimes["onnx"]
    w = next(w for w in rt.manifest["weights"] if w["patchable"])
    base = rt.weight(w["name"]).ravel()
    path = tmp_path / "a.shira"
    path.write_bytes(_adapter(rt.manifest, [1.0, 2.0, 3.0]))
    rt.switch(path)
    assert rt.weight(w["name"]).ravel()[5] == np.float32(base[5] + np.float32(2.0))

    before = os.stat(path)
    new = _adapter(rt.manifest, [-4.0, -5.0, -6.0])
    assert len(new) == before.st_size
    with open(path, "r+b") as f:   # in place: same inode, same size
        f.write(new)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)

    rt.switch(path)
    assert rt.weight(w["name"]).ravel()[5] == np.float32(base[5] + np.float32(-5.0))
    rt.switch(None)
    assert np.array_equal(rt.weight(w["name"]).ravel(), base)


# ------------------------------------------------------------------ base values come from load time


def _rewrite_patchable(data_file, manifest, in_place: bool):
    """Add 1.0 to every patchable weight's bytes, in place or as a new file renamed over the old one."""
    raw = bytearray(data_file.read_bytes())
    for w in manifest["weights"]:
        if w["patchable"]:
            view = np.frombuffer(raw, "<f4", w["nbytes"] // 4, w["offset"])
            view += 1.0
    if in_place:
        with open(data_file, "r+b") as f:
            f.write(raw)
    else:
        tmp = data_file.with_suffix(".new")
        tmp.write_bytes(raw)
        os.replace(tmp, data_file)


CHANGES = {
    "replaced-by-rename": (lambda f, m: _rewrite_patchable(f, m, in_place=False), None),
    "touched-same-bytes": (lambda f, m: os.utime(f), None),
    "rewritten-in-place": (lambda f, m: _rewrite_patchable(f, m, in_place=True),
                           "no longer holds the weights this runtime loaded"),
    "truncated-in-place": (lambda f, m: os.truncate(f, 1024), "truncated since the runtime loaded it"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_base_values_cannot_change_under_a_running_runtime(tiny_exports, tmp_path, change):
    export = shutil.copytree(tiny_exports["onnx"], tmp_path / "export")
    rt = Runtime(export, policy="instant")   # "instant": no session rebuild reads the changed file
    try:
        name = next(w["name"] for w in rt.manifest["weights"] if w["patchable"])
        loaded = {n: rt.weight(n) for n, s in rt._backend.slots.items() if s.patchable}
        edit, refused = CHANGES[change]
        edit(export / rt.manifest["weights"][0]["file"], rt.manifest)
        adapter = _adapter(rt.manifest, [1.0, 2.0, 3.0])
        if refused:
            with pytest.raises(BaseChanged, match=refused) as err:
                rt.switch(adapter)
            assert "model.onnx.data" in str(err.value) and "load the export again" in str(err.value)
        else:
            rt.switch(adapter)
            got = rt.weight(name).ravel()
            assert got[5] == np.float32(loaded[name].ravel()[5] + np.float32(2.0))
            rt.switch(None)
        for n, w in loaded.items():   # the base model the runtime loaded, bit for bit
            assert np.array_equal(rt.weight(n), w), n
        assert rt.active == ()
    finally:
        rt.close()


# ------------------------------------------------------------------ programs that switch and end


def _policies(backend_module: str) -> tuple[str, ...]:
    """The policies the backend accepts today (the set may change with the packed-switch work)."""
    return tuple(getattr(importlib.import_module(f"shira_edge.runtime.{backend_module}"), "POLICIES", ("auto",)))


SCRIPT = textwrap.dedent("""
    import sys
    from shira_edge.runtime import Runtime
    rt = Runtime(sys.argv[1], policy=sys.argv[2])
    rt.switch(sys.argv[3])
    rt.run([[2, 5, 7]])
    # ends here: no close(), no wait_ready(); whatever runs in the background must not crash the exit
""")


@pytest.mark.parametrize("policy", _policies("onnx_backend"))
def test_twenty_programs_that_switch_and_end_all_exit_0(tiny_exports, tmp_path, policy):
    from shira_edge.runtime.manifest import read_manifest

    export = tiny_exports["onnx"]
    adapter = write_shira(tmp_path / "a.shira", make_adapter("a", [make_target(
        w["name"], w["shape"], [0, 5, 9], np.float32([1, 2, 3]), base_digest=w["digest"])
        for w in read_manifest(export)["weights"] if w["patchable"]]))
    script = tmp_path / "switch_and_end.py"
    script.write_text(SCRIPT)

    def one(_):
        proc = subprocess.run([sys.executable, str(script), str(export), policy, str(adapter)],
                              capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stderr[-400:]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, range(20)))
    failures = [(code, err) for code, err in results if code != 0]
    assert not failures, f"{len(failures)}/20 exited non-zero, e.g. {failures[0]}"
