"""Runtime.switch on the tiny OPT exported through the real exporters (ONNX and ExecuTorch), with adapters made by
PEFT's SHiRA tuner and packed by `pack_adapter`. References are PEFT's own models in PyTorch."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shira_edge.runtime import AdapterMismatch, Runtime
from shira_edge.runtime.shira_format import ShiraFormatError, make_adapter, make_target, read_shira, write_shira
from tests.conftest import make_tiny_opt

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
IDS = np.array([[2, 45, 9, 301, 77, 5, 130, 12]])
BACKENDS = ["onnx", "executorch"]
FUSE_SCALES = [1.0, 0.5]


def _peft_adapter(seed: int, path):
    import torch
    from peft import ShiraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = ShiraConfig(r=2, target_modules=TARGETS, init_weights=False, random_seed=seed)
    get_peft_model(make_tiny_opt(seed=0), cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def adapters(tiny_opt_dir, tmp_path_factory):
    """Two PEFT SHiRA adapters (different masks and values), saved by PEFT and packed by shira-edge."""
    from shira_edge.pack import pack_adapter

    root = tmp_path_factory.mktemp("runtime-adapters")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        peft_dir = _peft_adapter(seed, root / f"peft-{name}")
        pack_adapter(peft_dir, root / f"{name}.shira", model=str(tiny_opt_dir))
        out[name] = (peft_dir, root / f"{name}.shira")
    return out


@pytest.fixture(scope="session")
def exports(tiny_exports):
    """backend -> export dir of the tiny OPT (seed 0): the session's shared exports (tests/conftest.py)."""
    return tiny_exports


@pytest.fixture(scope="session")
def runtimes(exports):
    """One Runtime per backend, shared: every test leaves it at the base model."""
    rts = {b: Runtime(d) for b, d in exports.items()}
    yield rts
    for rt in rts.values():
        rt.close()


@pytest.fixture(params=BACKENDS)
def rt(request, runtimes):
    runtime = runtimes[request.param]
    runtime.switch(None)
    yield runtime
    runtime.switch(None)


def _peft_model(adapters, names, scales=None):
    """PEFT's model with `names` active (in that order) at `scales`, unmerged: its forward adds the deltas."""
    from peft import PeftModel
    from peft.tuners.shira.layer import ShiraLayer

    model = PeftModel.from_pretrained(make_tiny_opt(seed=0), adapters[names[0]][0], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n][0], adapter_name=n)
    model.base_model.set_adapter(list(names))
    for n, s in zip(names, scales or [1.0] * len(names)):
        for layer in model.modules():
            if isinstance(layer, ShiraLayer):
                layer.set_scale(n, s)
    return model.eval()


def _torch_logits(model, ids=IDS):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def _fused_weights(model):
    """{base weight name: the weight PEFT's forward uses (base + d1 + d2 ..., in the active order)}."""
    import torch
    from peft.tuners.shira.layer import ShiraLayer

    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, ShiraLayer):
            w = layer.get_base_weight().clone()
            for a in layer.active_adapters:
                w += layer.get_delta_weight(a)
            out[name.removeprefix("base_model.model.") + ".weight"] = w.detach().numpy()
    return out


def _buffers(rt):
    return rt.weight_buffer.tobytes()


# ---------------------------------------------------------------- correctness against PEFT


def test_switch_matches_peft_merged_model(rt, adapters):
    path = adapters["a"][1]
    reference = _peft_model(adapters, ["a"])
    expected = _torch_logits(reference.merge_and_unload())
    rt.switch(str(path))
    assert rt.active == (("a", 1.0),)
    np.testing.assert_allclose(rt.run(IDS), expected, atol=1e-4, rtol=0)
    base_logits = _torch_logits(make_tiny_opt(seed=0))
    assert np.abs(expected - base_logits).max() > 1e-2        # the adapter really changes the model


def test_patched_weights_equal_peft_bit_for_bit(rt, adapters):
    fused = _fused_weights(_peft_model(adapters, ["a", "b"], FUSE_SCALES))
    rt.switch([adapters["a"][1], adapters["b"][1]], scales=FUSE_SCALES)
    for name, expected in fused.items():
        assert rt.weight(name).tobytes() == expected.tobytes(), name


def test_fusion_matches_peft_with_both_adapters_active(rt, adapters):
    expected = _torch_logits(_peft_model(adapters, ["a", "b"], FUSE_SCALES))
    rt.switch([adapters["a"][1], adapters["b"][1]], scales=FUSE_SCALES)
    assert rt.active == (("a", 1.0), ("b", 0.5))
    np.testing.assert_allclose(rt.run(IDS), expected, atol=1e-4, rtol=0)


def test_restore_is_bit_exact_after_a_b_fused_none(rt, adapters):
    base_buffers, base_logits = _buffers(rt), rt.run(IDS)
    a, b = adapters["a"][1], adapters["b"][1]
    rt.switch(a)
    rt.switch(b.read_bytes())                                   # bytes work as well as paths
    rt.switch([a, b], scales=[0.7, 1.3])
    assert _buffers(rt) != base_buffers
    rt.switch(None)
    assert rt.active == ()
    assert _buffers(rt) == base_buffers
    rt.wait_ready()
    assert np.array_equal(rt.run(IDS), base_logits)


def test_generate_equals_step_by_step_full_forwards(rt, adapters):
    rt.switch(adapters["b"][1])
    prompt = IDS[:, :5]
    tokens = rt.generate(prompt, max_new_tokens=6)
    seq = prompt
    for _ in range(6):
        nxt = rt.run(seq)[:, -1].argmax(-1)[:, None]
        seq = np.concatenate([seq, nxt], axis=1)
    assert tokens.shape == (1, 11)
    assert np.array_equal(tokens, seq)


def test_weight_is_a_copy_in_pytorch_layout(rt):
    model = make_tiny_opt(seed=0)
    name = "model.decoder.layers.1.self_attn.q_proj.weight"
    w = rt.weight(name)
    assert np.array_equal(w, model.get_parameter(name).detach().numpy())
    w[:] = 0
    assert rt.weight(name).any()
    with pytest.raises(KeyError, match="lm_head.weight"):
        rt.weight("lm_head.weight")


def test_public_views_are_read_only(rt, adapters):
    """weight_buffer and slots are views for checks and benchmarks: the weights change only through switch()."""
    buf, slot = rt.weight_buffer, rt.slots["model.decoder.layers.1.self_attn.q_proj.weight"]
    assert buf.dtype == np.float32 and not buf.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        buf[0] = 1.0
    with pytest.raises(TypeError):
        rt.slots["x"] = slot
    assert rt.backend_name == rt.manifest["backend"] and isinstance(rt.start_timings, dict)
    before = buf.copy()
    rt.switch(str(adapters["a"][1]))
    try:   # a view of the live weights, not a snapshot
        assert not np.array_equal(buf, before) and np.array_equal(buf, rt.weight_buffer)
    finally:
        rt.switch(None)
    assert np.array_equal(buf, before)


def test_prepared_adapters_are_cached(rt, adapters):
    path = adapters["a"][1]
    assert rt.prepare(path) is rt.prepare(str(path))
    assert rt.plan(path) is rt.plan(path)


def test_forget_drops_the_adapter_and_its_states_but_not_the_live_weights(rt, adapters):
    a, b = adapters["a"][1], adapters["b"][1]
    rt.switch([a, b], scales=[1.0, 0.5])
    live = _buffers(rt)
    prepared, fused = rt.prepare(a), rt.plan([a, b], scales=[1.0, 0.5])
    rt.forget(a)
    assert rt.prepare(a) is not prepared and rt.plan([a, b], scales=[1.0, 0.5]) is not fused
    assert _buffers(rt) == live
    rt.switch(None)


# ---------------------------------------------------------------- failed switches touch nothing


def _bad_adapter(case, rt, adapters, tmp_path):
    good = read_shira(adapters["a"][1])
    name = "model.decoder.layers.0.fc1.weight"
    t = good.targets[name]
    if case == "corrupt-file":
        data = bytearray(adapters["a"][1].read_bytes())
        return bytes(data[: len(data) // 2])
    if case == "wrong-base":   # the same adapter packed against another base model (seed 1)
        other = make_tiny_opt(seed=1)
        from shira_edge.runtime.fingerprint import weight_digest
        targets = [make_target(n, x.shape, x.indices, x.values, base_digest=weight_digest(
            other.get_parameter(n).detach().numpy())) for n, x in good.targets.items()]
        adapter = make_adapter("other-base", targets)
    elif case == "shape-mismatch":
        shape = (t.shape[1], t.shape[0])     # (in, out): a transposed adapter
        adapter = make_adapter("shape", [make_target(name, shape, t.indices % (shape[0] * shape[1]), t.values,
                                                     base_digest=t.base_digest)])
    elif case == "unknown-target":
        adapter = make_adapter("unknown", [make_target("model.decoder.layers.9.fc1.weight", t.shape, t.indices,
                                                       t.values, base_digest=t.base_digest)])
    elif case == "tied-lm-head":
        digest = next(w["digest"] for w in rt.manifest["weights"] if w["name"] == "lm_head.weight")
        adapter = make_adapter("lm", [make_target("lm_head.weight", (512, 32), [0, 7], [1.0, 2.0],
                                                  base_digest=digest)])
    elif case == "overflow-at-scale":
        return "overflow"
    path = tmp_path / f"{case}.shira"
    write_shira(path, adapter)
    return path


BAD = [
    ("corrupt-file", ShiraFormatError, "adapter|truncated|bytes|size|end"),
    ("wrong-base", AdapterMismatch, "different base weights"),
    ("shape-mismatch", AdapterMismatch, "has shape"),
    ("unknown-target", AdapterMismatch, "not a weight of this export"),
    ("tied-lm-head", AdapterMismatch, "not patchable"),
    ("overflow-at-scale", AdapterMismatch, "overflows float32"),
]


@pytest.mark.parametrize("case,error,match", BAD, ids=[c[0] for c in BAD])
def test_failed_switch_leaves_weights_untouched(rt, adapters, tmp_path, case, error, match):
    rt.switch(adapters["a"][1])
    before, logits, active = _buffers(rt), rt.run(IDS), rt.active
    bad = _bad_adapter(case, rt, adapters, tmp_path)
    with pytest.raises(error, match=match):
        if bad == "overflow":
            rt.switch([adapters["b"][1]], scales=[3e38])
        else:
            rt.switch([adapters["b"][1], bad])                  # the good one first: still nothing is written
    assert rt.active == active
    assert _buffers(rt) == before
    assert np.array_equal(rt.run(IDS), logits)


def test_bad_arguments_say_what_to_do(rt, adapters, tmp_path):
    with pytest.raises(ValueError, match="2 adapters"):
        rt.switch([adapters["a"][1], adapters["b"][1]], scales=[1.0])
    with pytest.raises(FileNotFoundError, match="missing.shira"):
        rt.switch(tmp_path / "missing.shira")
    with pytest.raises(ValueError, match="token ids"):
        rt.run(np.zeros((1, 3), np.float32))


# ---------------------------------------------------------------- threads


@pytest.mark.parametrize("backend,policy,in_place", [("onnx", "instant", False), ("onnx", "packed", False),
                                                     ("onnx", "auto", False), ("onnx", "auto", True),
                                                     ("executorch", "auto", True)])
def test_runs_in_other_threads_never_see_half_switched_weights(exports, adapters, backend, policy, in_place):
    # The rebuild path's "auto" serves from two sessions (direct, then packed) whose kernels round differently in the
    # last bits, so there a run must match one valid state to 1e-5 (states differ by far more); elsewhere (one
    # session per state, or the packed-in-place path's one session) it must match exactly.
    rounding = policy == "auto" and not in_place
    same = (lambda x, y: np.allclose(x, y, atol=1e-5, rtol=0)) if rounding else np.array_equal
    a, b = adapters["a"][1], adapters["b"][1]
    states = [None, a, b, [a, b]]
    with Runtime(exports[backend], policy=policy, in_place=in_place) as rt:
        valid = []
        for s in states:
            rt.switch(s)
            valid.append(rt.run(IDS))
        assert all(not np.allclose(x, y, atol=1e-3) for i, x in enumerate(valid) for y in valid[i + 1:])
        seen, stop, errors = [], threading.Event(), []

        def reader():
            try:
                while not stop.is_set():
                    seen.append(rt.run(IDS))
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for i in range(24 if policy != "packed" else 8):
            rt.switch(states[i % len(states)])
        stop.set()
        for t in threads:
            t.join()
        assert not errors
        assert len(seen) >= 4
        for out in seen:
            assert any(same(out, v) for v in valid), "a run saw weights of no valid state"


# ---------------------------------------------------------------- policies


def test_onnx_policies_give_the_same_model(exports, adapters):
    a = adapters["a"][1]
    results = {}
    for policy in ("instant", "packed", "auto"):   # the policies of the rebuild path (packed-in-place ignores them)
        with Runtime(exports["onnx"], policy=policy, in_place=False) as rt:
            rt.switch(a)
            results[policy] = rt.run(IDS)
            assert rt.wait_ready(timeout=60)
            assert rt.ready
            np.testing.assert_allclose(rt.run(IDS), results[policy], atol=1e-5, rtol=0)
    np.testing.assert_allclose(results["instant"], results["packed"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(results["auto"], results["packed"], atol=1e-5, rtol=0)
    with Runtime(exports["onnx"]) as rt:
        assert rt.switch_path == "packed-in-place" and rt.ready
        rt.switch(a)
        np.testing.assert_allclose(rt.run(IDS), results["packed"], atol=1e-5, rtol=0)


def test_unknown_policy_is_refused(exports):
    with pytest.raises(ValueError, match="policy 'fast'"):
        Runtime(exports["onnx"], policy="fast")
    with pytest.raises(ValueError, match="instant"):
        Runtime(exports["executorch"], policy="instant")


# ---------------------------------------------------------------- docs


def test_module_docstrings_run(exports, tmp_path, monkeypatch):
    import doctest

    import shira_edge.runtime as runtime
    from shira_edge.runtime import patch, rwlock, scatter

    (tmp_path / "out").symlink_to(exports["onnx"])
    monkeypatch.chdir(tmp_path)          # the package docstring uses out/ and writes a.shira here
    for module in (runtime, patch, rwlock, scatter):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
