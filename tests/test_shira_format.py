"""The .shira format (docs/shira-format.md): golden bytes, determinism, round trips and hostile files."""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shira_edge.runtime.shira_format import (
    MAX_HEADER, PREFIX, ShiraAdapter, ShiraFormatError, ShiraTarget, assemble, decode_indices, encode_indices,
    encode_shira, make_adapter, make_target, read_shira, read_shira_layout, store_values, write_shira,
)

GOLDEN = Path(__file__).parent / "golden"
DTYPES = ["fp32", "fp16", "bf16"]


def golden_adapter(dtype: str) -> ShiraAdapter:
    """Three targets covering the three index widths' cases: plain u8, u8 with escapes, u16."""
    targets = [
        make_target("b.fc.weight", (4, 8), [30, 2, 9], [2.0, -1.0, 0.5], base_digest="ab" * 32, dtype=dtype),
        make_target("a.proj.weight", (300, 300), [0, 300, 1000], [1.5, -0.25, 3.0], base_digest="cd" * 32,
                    scale=0.5, dtype=dtype),
        make_target("c.out.weight", (100, 100), [1000, 2000, 3000], [-2.0, 0.125, 1.0], base_digest="ef" * 32,
                    dtype=dtype),
    ]
    return make_adapter("golden-model", targets, dtype=dtype, metadata={"mask_type": "random", "seed": 7})


def split(blob: bytes) -> tuple[dict, bytes]:
    """A valid blob -> (header dict, data section), for crafting hostile files with assemble()."""
    _, _, n = PREFIX.unpack(blob[:PREFIX.size])
    return json.loads(blob[PREFIX.size:PREFIX.size + n]), blob[PREFIX.size + n:]


def entry(header: dict, name: str) -> dict:
    return next(t for t in header["targets"] if t["name"] == name)


# ------------------------------------------------------------------ golden bytes and determinism


@pytest.mark.parametrize("dtype", DTYPES)
def test_golden_bytes(dtype):
    # The committed files are the spec's worked example; a change here is a format change (bump VERSION).
    # Regenerate only on purpose: SHIRA_REGEN_GOLDEN=1 pytest tests/test_shira_format.py -k golden
    path = GOLDEN / f"tiny-{dtype}-v1.shira"
    blob = encode_shira(golden_adapter(dtype))
    if os.environ.get("SHIRA_REGEN_GOLDEN"):
        path.write_bytes(blob)
        pytest.skip("golden file rewritten")
    assert blob == path.read_bytes()


def test_golden_layout_matches_the_byte_table():
    blob = (GOLDEN / "tiny-fp32-v1.shira").read_bytes()
    assert blob[:8] == b"\x89SHIRA\r\n"
    version, header_len = struct.unpack("<II", blob[8:16])
    assert version == 1 and (16 + header_len) % 8 == 0
    assert blob[16:16 + header_len].rstrip(b" ").endswith(b"}")  # JSON, then space padding to the data
    header, data = split(blob)
    assert data == blob[16 + header_len:] and entry(header, "a.proj.weight")["index_offset"] == 0
    a, b, c = (entry(header, n) for n in ("a.proj.weight", "b.fc.weight", "c.out.weight"))
    # gaps 0, 300, 700 in u8: 300 = 255+45 and 700 = 255+255+190
    assert a["index_width"] == 1 and data[a["index_offset"]:][:a["index_length"]] == bytes([0, 255, 45, 255, 255, 190])
    assert b["index_width"] == 1 and data[b["index_offset"]:][:b["index_length"]] == bytes([2, 7, 21])
    assert c["index_width"] == 2 and np.frombuffer(data[c["index_offset"]:][:6], "<u2").tolist() == [1000] * 3
    assert np.frombuffer(data[b["values_offset"]:][:12], "<f4").tolist() == [-1.0, 0.5, 2.0]
    assert [t["name"] for t in header["targets"]] == ["a.proj.weight", "b.fc.weight", "c.out.weight"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_golden_file_reads_back(dtype):
    back = read_shira(GOLDEN / f"tiny-{dtype}-v1.shira")
    a = back.targets["a.proj.weight"]
    assert a.indices.tolist() == [0, 300, 1000] and a.scale == 0.5
    assert a.delta_values().tolist() == [0.75, -0.125, 1.5]  # exact in every dtype
    assert back.targets["b.fc.weight"].indices.tolist() == [2, 9, 30]
    assert back.targets["b.fc.weight"].dense_delta()[3, 6] == 2.0  # 30 = row 3 * 8 + col 6
    assert back.metadata == {"mask_type": "random", "seed": 7} and back.base_model["name"] == "golden-model"


def test_order_of_targets_and_entries_does_not_change_the_bytes():
    ref = encode_shira(golden_adapter("fp32"))
    rng = np.random.default_rng(0)
    for _ in range(3):
        shuffled = {}
        for name in rng.permutation(list(golden_adapter("fp32").targets)):
            t = golden_adapter("fp32").targets[name]
            p = rng.permutation(t.nnz)
            shuffled[name] = ShiraTarget(t.name, t.shape, t.indices[p], t.values[p], t.scale, t.base_digest)
        base = golden_adapter("fp32")
        assert encode_shira(ShiraAdapter(base.base_model, "fp32", {"seed": 7, "mask_type": "random"},
                                         shuffled)) == ref


def test_write_is_atomic_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "a.shira"
    out.write_bytes(b"old")
    import shira_edge.runtime.shira_format as fmt

    def interrupted(fd):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-write

    monkeypatch.setattr(fmt.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_shira(out, golden_adapter("fp32"))
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.shira"]
    monkeypatch.undo()
    write_shira(out, golden_adapter("fp32"))
    assert out.read_bytes() == encode_shira(golden_adapter("fp32"))


# ------------------------------------------------------------------ indices


@pytest.mark.parametrize("gaps,width", [
    ([0, 1, 254], 1), ([254, 255, 256, 510, 1], 1), ([5, 65535, 65536, 2], 2), ([70000, 2**32 + 5, 1], 4),
], ids=["u8-plain", "u8-escapes", "u16-escapes", "u32-escapes"])
def test_index_stream_round_trips_at_escape_edges(gaps, width):
    indices = np.cumsum(np.array(gaps, dtype=np.int64))
    w, stream = encode_indices(indices)
    assert w == width
    assert decode_indices(stream).tolist() == indices.tolist()


@pytest.mark.parametrize("density", [0.01, 0.02, 0.08])
def test_index_bytes_at_opt_125m_density(density):
    # The design goal: about 2 bytes per index or less at 1-2% density (measured in benchmarks/format_size.py)
    rng = np.random.default_rng(1)
    n = 768 * 3072
    indices = np.sort(rng.choice(n, int(n * density), replace=False))
    _, stream = encode_indices(indices)
    assert stream.nbytes / len(indices) < 1.2


# ------------------------------------------------------------------ round trips


@st.composite
def adapters(draw):
    dtype = draw(st.sampled_from(DTYPES))
    targets = []
    for name in draw(st.sets(st.text(min_size=1, max_size=12), min_size=0, max_size=4)):
        out = draw(st.integers(1, 700))
        inn = draw(st.integers(1, 700))
        idx = draw(st.sets(st.integers(0, out * inn - 1), max_size=60))
        vals = draw(st.lists(st.floats(-6e4, 6e4, width=32), min_size=len(idx), max_size=len(idx)))
        scale = draw(st.floats(-4, 4, allow_nan=False))
        digest = draw(st.text("0123456789abcdef", min_size=64, max_size=64))
        targets.append(make_target(name, (out, inn), list(idx), np.array(vals, np.float32), base_digest=digest,
                                   scale=scale, dtype=dtype))
    meta = draw(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3))
    return make_adapter(draw(st.text(max_size=10)), targets, dtype=dtype, metadata=meta)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapters())
def test_random_adapters_round_trip(adapter):
    blob = encode_shira(adapter)
    back = read_shira(blob)
    assert back.base_model == adapter.base_model and back.dtype == adapter.dtype
    assert back.metadata == adapter.metadata and list(back.targets) == sorted(adapter.targets)
    for name, t in adapter.targets.items():
        b = back.targets[name]
        assert (b.shape, b.scale, b.base_digest) == (t.shape, t.scale, t.base_digest)
        order = np.argsort(t.indices)
        assert b.indices.tolist() == t.indices[order].tolist()
        assert b.values.tobytes() == t.values[order].tobytes()  # bit-exact in the stored dtype
    assert encode_shira(back) == blob


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_survive_each_dtype(dtype):
    vals = np.array([1.0, -0.1, 3e-3, 1234.5], np.float32)
    t = read_shira(encode_shira(make_adapter("m", [make_target("w", (2, 2), [0, 1, 2, 3], vals,
                                                                base_digest="0" * 64, dtype=dtype)],
                                             dtype=dtype))).targets["w"]
    rtol = {"fp32": 0, "fp16": 2**-11, "bf16": 2**-8}[dtype]
    np.testing.assert_allclose(t.delta_values(), vals, rtol=rtol)


def test_bf16_rounds_to_nearest_even():
    # 1 + 2**-8 is halfway between two bf16 values: ties go to the even one (1.0)
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, -2.5], np.float32)
    assert (store_values(x, "bf16").astype(np.uint32) << 16).view(np.float32).tolist() == [1.0, 1 + 2**-6, -2.5]


def test_memory_mapped_read_from_path(tmp_path):
    path = write_shira(tmp_path / "g.shira", golden_adapter("fp32"))
    t = read_shira(path).targets["b.fc.weight"]
    base = t.values
    while isinstance(base, np.ndarray):
        base = base.base
    # values are views into the map, not copies
    assert isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)
    assert not t.values.flags.writeable and t.values.tolist() == [-1.0, 0.5, 2.0]


# ------------------------------------------------------------------ writer refuses bad adapters


@pytest.mark.parametrize("kwargs,message", [
    (dict(indices=[1, 1], values=[1.0, 2.0]), "target 'w': duplicate index 1"),
    (dict(indices=[0, 8], values=[1.0, 2.0]), "target 'w': index out of range for shape 2x4"),
    (dict(indices=[0, 1], values=[1.0, np.nan]), "target 'w': values hold NaN or inf (after conversion to fp32)"),
], ids=["duplicate", "out-of-range", "nan"])
def test_writer_refuses(kwargs, message):
    t = make_target("w", (2, 4), base_digest="0" * 64, **kwargs)
    with pytest.raises(ShiraFormatError, match=re.escape(message)):
        encode_shira(make_adapter("m", [t]))


def test_writer_refuses_fp16_overflow_and_wrong_fingerprint():
    t = make_target("w", (2, 4), [0], [1e5], base_digest="0" * 64)
    with pytest.raises(ShiraFormatError, match=re.escape("values hold NaN or inf (after conversion to fp16)")):
        encode_shira(make_adapter("m", [t], dtype="fp16"))
    a = make_adapter("m", [make_target("w", (2, 4), [0], [1.0], base_digest="0" * 64)])
    with pytest.raises(ShiraFormatError, match="does not match the targets' base digests"):
        encode_shira(ShiraAdapter({"name": "m", "fingerprint": "sha256:" + "0" * 64}, "fp32", {}, a.targets))


# ------------------------------------------------------------------ hostile files


def golden_blob() -> bytes:
    return encode_shira(golden_adapter("fp32"))


def patched_data(edit) -> bytes:
    header, data = split(golden_blob())
    data = bytearray(data)
    edit(header, data)
    return assemble(header, bytes(data))


def patched_header(edit) -> bytes:
    header, data = split(golden_blob())
    edit(header)
    return assemble(header, data)


def with_prefix(magic=b"\x89SHIRA\r\n", version=1, header_len=None) -> bytes:
    blob = golden_blob()
    n = struct.unpack("<I", blob[12:16])[0] if header_len is None else header_len
    return struct.pack("<8sII", magic, version, n) + blob[16:]


def set_byte(name, key, i, value):
    def edit(header, data):
        data[entry(header, name)[key] + i] = value
    return edit


def set_value(name, i, value):
    def edit(header, data):
        off = entry(header, name)["values_offset"] + 4 * i
        data[off:off + 4] = struct.pack("<f", value)
    return edit


def set_field(name, key, value):
    def edit(header):
        entry(header, name)[key] = value
    return edit


_, LAYOUT = read_shira_layout(golden_blob())
B_IDX, B_VAL = LAYOUT["b.fc.weight"].index_offset, LAYOUT["b.fc.weight"].values_offset
C_IDX, C_VAL = LAYOUT["c.out.weight"].index_offset, LAYOUT["c.out.weight"].values_offset
END = len(golden_blob())

HOSTILE = {
    "empty": (lambda: b"", "<bytes>: offset 0: truncated: 0 bytes, shorter than the 16-byte prefix"),
    "truncated-prefix": (lambda: golden_blob()[:10], "<bytes>: offset 0: truncated: 10 bytes, shorter than"),
    "truncated-header": (lambda: golden_blob()[:100], "<bytes>: offset 12: truncated: header needs bytes 16.."),
    "truncated-data": (lambda: golden_blob()[:-1], "target 'c.out.weight' values at offset "),
    "bad-magic": (lambda: with_prefix(magic=b"GGUF\0\0\0\0"), "<bytes>: offset 0: bad magic b'GGUF\\x00"),
    "bad-version": (lambda: with_prefix(version=2),
                    "<bytes>: offset 8: unsupported version 2 (this reader reads version 1)"),
    "oversized-header": (lambda: with_prefix(header_len=MAX_HEADER + 8),
                         f"<bytes>: offset 12: header length {MAX_HEADER + 8} is over the {MAX_HEADER}-byte cap"),
    "unaligned-header": (lambda: with_prefix(header_len=801),
                         "<bytes>: offset 12: header length 801 does not end on an 8-byte boundary"),
    "header-not-json": (lambda: assemble({}, b"")[:16] + b"{{{{{{{{", "not valid UTF-8 JSON"),
    "deeply-nested-json": (lambda: struct.pack("<8sII", b"\x89SHIRA\r\n", 1, 200000) + b"[" * 200000,
                           "not valid UTF-8 JSON"),
    "nan-in-header": (lambda: patched_header(lambda h: None).replace(b'"scale":0.5', b'"scale":NaN'),
                      "not valid UTF-8 JSON: NaN is not allowed in the header"),
    "out-of-range-index": (lambda: patched_data(set_byte("b.fc.weight", "index_offset", 2, 25)),
                           f"target 'b.fc.weight' indices at offset {B_IDX}: index 34 out of range for shape 4x8"),
    "unsorted-index": (lambda: patched_data(set_byte("b.fc.weight", "index_offset", 1, 0)),
                       f"target 'b.fc.weight' indices at offset {B_IDX}: indices not strictly increasing: entry 1 is 2 "
                       "after 2"),
    "nnz-mismatch": (lambda: patched_data(set_byte("b.fc.weight", "index_offset", 1, 255)),
                     f"target 'b.fc.weight' indices at offset {B_IDX}: stream decodes to 2 indices, header says nnz=3"),
    "dangling-escape": (lambda: patched_data(set_byte("b.fc.weight", "index_offset", 2, 255)),
                        f"target 'b.fc.weight' indices at offset {B_IDX}: index stream ends inside an escape run"),
    "nan-value": (lambda: patched_data(set_value("b.fc.weight", 1, float("nan"))),
                  f"target 'b.fc.weight' values at offset {B_VAL + 4}: value 1 is NaN or inf"),
    "inf-value": (lambda: patched_data(set_value("b.fc.weight", 2, float("inf"))), "value 2 is NaN or inf"),
    "overlapping-sections": (
        lambda: patched_header(set_field("c.out.weight", "index_offset", entry(split(golden_blob())[0],
                                                                               "b.fc.weight")["values_offset"])),
        f"target 'b.fc.weight' values at offset {B_VAL}: overlaps target 'c.out.weight' indices, which ends "
        f"at offset {B_VAL + 6}"),
    "hole-between-sections": (lambda: patched_data(lambda h, d: (set_field("c.out.weight", "values_offset",
                                                                           entry(h, "c.out.weight")
                                                                           ["values_offset"] + 8)(h),
                                                                 d.extend(b"\0" * 8))),
                              f"target 'c.out.weight' values at offset {C_VAL + 8}: hole after target "
                              f"'c.out.weight' indices: expected offset {C_VAL}"),
    "nonzero-padding": (lambda: patched_data(lambda h, d: d.__setitem__(entry(h, "b.fc.weight")["index_offset"] + 3,
                                                                        7)),
                        f"padding at offset {B_IDX + 3}: alignment padding must be zero bytes"),
    "trailing-bytes": (lambda: golden_blob() + b"\0" * 8,
                       f"<bytes>: offset {END}: 8 trailing bytes after the last section"),
    "values-length-vs-nnz": (lambda: patched_header(set_field("b.fc.weight", "nnz", 2)),
                             f"target 'b.fc.weight' values at offset {B_VAL}: 12 bytes do not hold nnz=2 fp32 values"),
    "bool-shape": (lambda: patched_header(set_field("b.fc.weight", "shape", [True, 8])),
                   "target 'b.fc.weight': shape [True, 8] is not [out, in] with positive integers"),
    "huge-shape": (lambda: patched_header(set_field("b.fc.weight", "shape", [2**40, 2**40])),
                   "target 'b.fc.weight': shape 1099511627776x1099511627776 has more than 2**48 elements"),
    "huge-offset": (lambda: patched_header(set_field("b.fc.weight", "index_offset", 10**30)),
                    re.compile(r"target 'b.fc.weight' indices at offset 10{26}\d{4}: truncated: needs 3 bytes, "
                               r"file ends at \d+")),
    "bad-dtype": (lambda: patched_header(lambda h: h.update(dtype="int8")),
                  "<bytes>: header: dtype 'int8' is not one of fp32, fp16, bf16"),
    "unsorted-targets": (lambda: patched_header(lambda h: h["targets"].reverse()),
                         "target 'b.fc.weight': targets must be sorted by name with no duplicates"),
    "fingerprint-mismatch": (lambda: patched_header(set_field("b.fc.weight", "base_digest", "00" * 32)),
                             "<bytes>: header: base_model.fingerprint sha256:"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_refused_with_its_error(case):
    make, message = HOSTILE[case]
    with pytest.raises(ShiraFormatError) as info:
        read_shira(make())
    if isinstance(message, re.Pattern):
        assert message.search(str(info.value)), str(info.value)
    else:
        assert message in str(info.value)


def test_hostile_path_names_the_file(tmp_path):
    path = tmp_path / "bad.shira"
    path.write_bytes(golden_blob()[:-4])
    with pytest.raises(ShiraFormatError, match=re.escape(f"{path}: target 'c.out.weight' values at offset")):
        read_shira(path)
    with pytest.raises(ShiraFormatError, match=re.escape(f"{tmp_path / 'missing.shira'}: cannot read")):
        read_shira(tmp_path / "missing.shira")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupted_files_fail_only_with_shira_format_error(data):
    # Any byte flips or truncation: either a valid adapter comes back or ShiraFormatError, never anything else.
    blob = bytearray(golden_blob())
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    blob = bytes(blob[:data.draw(st.integers(0, len(blob)))])
    try:
        read_shira(blob)
    except ShiraFormatError:
        pass


WEIRD = [None, True, -1, 1.5, 10**400, "x", [], [1], {}, {"a": 1}, [True, 8], [10**30, 1]]


@pytest.mark.parametrize("key", ["name", "shape", "nnz", "scale", "base_digest", "index_width", "index_offset",
                                 "index_length", "values_offset", "values_length"])
def test_any_json_value_in_a_target_field_is_a_format_error(key):
    for value in WEIRD:
        if key == "scale" and value in (-1, 1.5):
            continue  # valid scales
        with pytest.raises(ShiraFormatError):
            read_shira(patched_header(set_field("b.fc.weight", key, value)))


@pytest.mark.parametrize("key", ["base_model", "dtype", "metadata", "targets"])
def test_any_json_value_in_a_header_field_is_a_format_error(key):
    for value in WEIRD:
        if key == "metadata" and isinstance(value, dict):
            continue  # any object is valid metadata
        with pytest.raises(ShiraFormatError):
            read_shira(patched_header(lambda h: h.update({key: value})))
