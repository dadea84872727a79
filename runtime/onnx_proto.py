"""The few ONNX protobuf fields the packed-switch path reads and writes, without the `onnx` package (device code is
numpy + onnxruntime only).

Read: each initializer's name, dims and external-data entries (location, offset, length, and ORT's
`prepacked_<i>` = "<kernel>+<hash>|<offset>;<length>;<alignment>" entries). Write: a one-MatMul model used to probe
ORT's packed layout. Field numbers are onnx.proto's (ModelProto.graph = 7, GraphProto.initializer = 5, ...).

    >>> model = matmul_model(k=2, n=3, weight=np.arange(6, dtype=np.float32))
    >>> [(t.name, t.dims) for t in initializers(model)]
    [('W', [2, 3])]
    >>> consumers(model)
    {'X': ['MatMul'], 'W': ['MatMul']}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FLOAT = 1   # TensorProto.DataType.FLOAT


@dataclass
class Initializer:
    name: str = ""
    dims: list[int] = field(default_factory=list)
    external: dict[str, str] = field(default_factory=dict)

    def prepacked(self) -> list[tuple[str, int, int]]:
        """[(kernel, offset, length)] of ORT's saved prepacked blobs of this tensor, in key order."""
        out = []
        for key in sorted(k for k in self.external if k.startswith("prepacked_")):
            kernel, _, where = self.external[key].partition("|")
            offset, length, *_ = where.split(";")
            out.append((kernel.split("+")[0], int(offset), int(length)))
        return out


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


def matmul_model(k: int, n: int, weight: np.ndarray, opset: int = 17) -> bytes:
    """Y[b, s, n] = X[b, s, k] @ W[k, n] with W a float32 initializer: the probe of ORT's MatMul packing."""
    w = np.ascontiguousarray(weight, "<f4").reshape(k, n)
    tensor = _int(1, k) + _int(1, n) + _int(2, FLOAT) + _msg(8, "W") + _msg(9, w.tobytes())
    node = _msg(1, "X") + _msg(1, "W") + _msg(2, "Y") + _msg(3, "probe") + _msg(4, "MatMul")
    graph = (_msg(1, node) + _msg(2, "shira-layout-probe") + _msg(5, tensor)
             + _msg(11, _value_info("X", ["b", "s", k])) + _msg(12, _value_info("Y", ["b", "s", n])))
    return _int(1, 8) + _msg(8, _msg(1, "") + _int(2, opset)) + _msg(7, graph)
