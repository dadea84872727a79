"""The few ONNX protobuf fields the packed-switch path reads and writes, without the `onnx` package (device code is
numpy + onnxruntime only).

Read: each initializer's name, dims, type, inline raw data and external-data entries (location, offset, length, and
ORT's `prepacked_<n>` = "<kernel>+<hash>|<offset>;<length>;<checksum>" entries, n the number of blobs); which
initializers only MatMuls read as their weight. Write: models of constant MatMuls (ORT packs their weights: the layout
probe, and the blobs of the pack cache), and a model's initializers moved to new external-data entries. Field
numbers are onnx.proto's (ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.external_data = 13, ...).

    >>> model = matmul_model(k=2, n=3, weight=np.arange(6, dtype=np.float32))
    >>> [(t.name, t.dims) for t in initializers(model)]
    [('W', [2, 3])]
    >>> consumers(model), matmul_weights(model)
    ({'X_W': ['MatMul'], 'W': ['MatMul']}, {'W'})
    >>> moved = with_external_data(model, {"W": [("location", "w.bin"), ("offset", "0"), ("length", "24")]})
    >>> [(t.external, t.raw) for t in initializers(moved)]
    [({'location': 'w.bin', 'offset': '0', 'length': '24'}, None)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

FLOAT = 1   # TensorProto.DataType.FLOAT


@dataclass
class Initializer:
    name: str = ""
    dims: list[int] = field(default_factory=list)
    external: dict[str, str] = field(default_factory=dict)
    data_type: int = 0
    raw: bytes | None = None   # raw_data of an inline tensor (None when its data is external, or typed fields)

    def prepacked_blobs(self) -> list["PrepackedBlob"]:
        """ORT's saved prepacked blobs of this tensor, in entry order (one blob per entry: what the CPU kernels save)."""
        out = []
        for entry in sorted(k for k in self.external if k.startswith("prepacked_")):
            key, _, where = self.external[entry].partition("|")
            offset, length, checksum = where.split(";")[:3]
            out.append(PrepackedBlob(entry, key, int(offset), int(length), checksum))
        return out

    def prepacked(self) -> list[tuple[str, int, int]]:
        """[(kernel, offset, length)] of ORT's saved prepacked blobs of this tensor, in key order."""
        return [(b.key.split("+")[0], b.offset, b.length) for b in self.prepacked_blobs()]


class PrepackedBlob(NamedTuple):
    """One `prepacked_<n>` external-data entry: "<kernel>+<hash>|<offset>;<length>;<checksum>"."""
    entry: str
    key: str
    offset: int
    length: int
    checksum: str

    def at(self, offset: int) -> tuple[str, str]:
        """The same entry, for the blob copied to `offset`."""
        return self.entry, f"{self.key}|{offset};{self.length};{self.checksum}"


# ---------------------------------------------------------------- wire format


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def fields(buf: bytes):
    """(field number, wire type, value) of one message: ints for varints, bytes for length-delimited."""
    i, end = 0, len(buf)
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire} is not supported")
        yield number, wire, value


def _packed_ints(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    out, i = [], 0
    while i < len(value):
        v, i = _varint(value, i)
        out.append(v)
    return out


def _main_graph(model: bytes, field: int):
    """The main graph's (ModelProto field 7) entries of one GraphProto field: 1 node, 5 initializer."""
    for number, _, graph in fields(model):
        if number == 7:
            yield from (value for gnum, _, value in fields(graph) if gnum == field)


def initializers(model: bytes) -> list[Initializer]:
    """The graph initializers of a serialized ModelProto (main graph only)."""
    out = []
    for tensor in _main_graph(model, 5):
        init = Initializer()
        for tnum, _, value in fields(tensor):
            if tnum == 1:
                init.dims += _packed_ints(value)
            elif tnum == 2:
                init.data_type = value
            elif tnum == 9:
                init.raw = bytes(value)
            elif tnum == 8:
                init.name = bytes(value).decode()
            elif tnum == 13:
                entry = {n: bytes(v).decode() for n, _, v in fields(value)}
                init.external[entry.get(1, "")] = entry.get(2, "")
        out.append(init)
    return out


def consumers(model: bytes) -> dict[str, list[str]]:
    """tensor name -> op types of the main-graph nodes that read it."""
    out: dict[str, list[str]] = {}
    for node in _main_graph(model, 1):
        parts = list(fields(node))
        op = next((bytes(v).decode() for n, _, v in parts if n == 4), "")
        for n, _, v in parts:
            if n == 1:
                out.setdefault(bytes(v).decode(), []).append(op)
    return out


def matmul_weights(model: bytes) -> set[str]:
    """Initializers that main-graph nodes read only as a MatMul's second input (B): the weights ORT prepacks."""
    names = {bytes(v).decode() for t in _main_graph(model, 5) for n, _, v in fields(t) if n == 8}
    as_b, elsewhere = set(), set()
    for node in _main_graph(model, 1):
        parts = list(fields(node))
        op = next((bytes(v).decode() for n, _, v in parts if n == 4), "")
        inputs = [bytes(v).decode() for n, _, v in parts if n == 1]
        for i, name in enumerate(inputs):
            (as_b if op == "MatMul" and i == 1 else elsewhere).add(name)
    outputs = {bytes(v).decode() for o in _main_graph(model, 12) for n, _, v in fields(o) if n == 1}
    return (as_b & names) - elsewhere - outputs


def _field(number: int, wire: int, value) -> bytes:
    """Re-encode one field as fields() gave it."""
    if wire == 0:
        return _int(number, value)
    if wire == 2:
        return _msg(number, bytes(value))
    return _key(number, wire) + bytes(value)


def with_external_data(model: bytes, external: dict[str, list[tuple[str, str]]]) -> bytes:
    """The model with the named main-graph initializers' data moved to external data entries [(key, value)]
    (location, offset, length, ORT's prepacked_<i>); every other byte is kept as it was."""
    def tensor(buf: bytes) -> bytes:
        parts = list(fields(buf))
        name = next((bytes(v).decode() for n, _, v in parts if n == 8), "")
        if name not in external:
            return buf
        body = b"".join(_field(n, w, v) for n, w, v in parts if n not in (9, 13, 14))   # raw, external, location
        body += b"".join(_msg(13, _msg(1, k) + _msg(2, v)) for k, v in external[name])
        return body + _int(14, 1)   # data_location = EXTERNAL

    def graph(buf: bytes) -> bytes:
        return b"".join(_field(n, w, tensor(bytes(v)) if n == 5 else v) for n, w, v in fields(buf))

    return b"".join(_field(n, w, graph(bytes(v)) if n == 7 else v) for n, w, v in fields(model))


def _key(number: int, wire: int) -> bytes:
    return _enc_varint(number << 3 | wire)


def _enc_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(number: int, value: int) -> bytes:
    return _key(number, 0) + _enc_varint(value)


def _msg(number: int, payload: bytes | str) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return _key(number, 2) + _enc_varint(len(payload)) + payload


def _value_info(name: str, dims: list) -> bytes:
    shape = b"".join(_msg(1, _msg(2, d) if isinstance(d, str) else _int(1, d)) for d in dims)
    return _msg(1, name) + _msg(2, _msg(1, _int(1, FLOAT) + _msg(2, shape)))


def _nested(number: int, parts: list) -> list:
    """A length-delimited field over `parts` without joining them: big payloads are copied once, at the end."""
    return [_key(number, 2) + _enc_varint(sum(len(p) for p in parts))] + parts


def matmuls_model(weights: list[tuple[str, np.ndarray]], opset: int = 17) -> bytes:
    """Y_name[b, s, n] = X_name[b, s, k] @ name[k, n] for each float32 weight: a model ORT prepacks these weights in,
    exactly as it packs a constant MatMul weight of any model."""
    nodes, inits, inputs, outputs = [], [], [], []
    for name, weight in weights:
        k, n = weight.shape
        raw = memoryview(np.ascontiguousarray(weight, "<f4")).cast("B")
        inits += _nested(5, [_int(1, k) + _int(1, n) + _int(2, FLOAT) + _msg(8, name)] + _nested(9, [raw]))
        nodes.append(_msg(1, _msg(1, "X_" + name) + _msg(1, name) + _msg(2, "Y_" + name) + _msg(3, "mm_" + name)
                          + _msg(4, "MatMul")))
        inputs.append(_msg(11, _value_info("X_" + name, ["b", "s", k])))
        outputs.append(_msg(12, _value_info("Y_" + name, ["b", "s", n])))
    graph = nodes + [_msg(2, "shira-matmuls")] + inits + inputs + outputs
    return b"".join([_int(1, 8), _msg(8, _msg(1, "") + _int(2, opset))] + _nested(7, graph))


def matmul_model(k: int, n: int, weight: np.ndarray, opset: int = 17) -> bytes:
    """Y[b, s, n] = X[b, s, k] @ W[k, n] with W a float32 initializer: the probe of ORT's MatMul packing."""
    return matmuls_model([("W", np.asarray(weight, "<f4").reshape(k, n))], opset)
