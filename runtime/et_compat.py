"""Everything shira-edge uses from executorch that executorch does not promise, pinned to one executorch version.

ExecuTorch's Python bindings and serializers expose a few underscored names, and XNNPACK's packed weight cache has
a file format of its own; shira-edge relies on both. They are gathered here, next to the version they were read
from, so that moving the pin is one reviewed change: tests/test_runtime_packed_executorch.py fails loudly when the
installed executorch is not `EXECUTORCH_VERSION`, and a different version must be re-checked against the sources
cited below before the pin moves.

    >>> EXECUTORCH_VERSION
    '1.5.1'
    >>> XNN_CACHE_MAGIC == int.from_bytes(b"CWPX", "little")
    True
"""

from __future__ import annotations

import struct

EXECUTORCH_VERSION = "1.5.1"

# XNNPACK's packed weight cache file (backends/xnnpack/runtime/XNNWeightsCache.cpp, save_packed_index in 1.5.x):
# packed blocks, then an index of entries [name_len:u32][name][file_offset:u64][data_size:u64][seed:u32], then a
# footer [index_start:u64][entry_count:u32][magic:u32][version:u32]. An entry's name is the weight's named-data key
# followed by its bias's key (none without a bias).
XNN_CACHE_MAGIC = 0x58505743
XNN_CACHE_VERSION = 2
XNN_FOOTER = struct.Struct("<QIII")
XNN_ENTRY = struct.Struct("<QQI")


# ExecuTorch's LLM kernels (extension/llm/custom_ops: op_update_cache.cpp, op_sdpa.cpp), what export_llm's programs
# call. The wheel ships them only inside its ahead-of-time library for torch; loading that library also registers
# them with ExecuTorch's kernel registry, the one the bindings and the native runner share (it links libexecutorch
# and libtorch's C++ libraries; Python torch is not imported).
LLM_KERNELS = ("llama::update_cache", "llama::custom_sdpa")
LLM_KERNELS_LIBRARY = "extension/llm/custom_ops/libcustom_ops_aot_lib.so"


def installed_version() -> str:
    """The installed executorch's version without its local tag ("1.5.1+cpu" -> "1.5.1"), without importing it."""
    from importlib.metadata import version

    return version("executorch").split("+")[0]


def load_from_buffer(pte: bytes, ptd: bytes):
    """The Python bindings' loader over in-memory program and data (both must outlive the module; it does not copy)."""
    from executorch.extension.pybindings import portable_lib

    return portable_lib._load_for_executorch_from_buffer(pte, ptd)


def reset_threadpool(threads: int) -> None:
    """Size ExecuTorch's process-wide thread pool (the one XNNPACK runs on), as the bindings expose it; nothing if
    it has that size already. A resize destroys the pool every loaded program points to: do it before loading."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != int(threads):
        portable_lib._unsafe_reset_threadpool(int(threads))


def threadpool_threads() -> int:
    """Threads in ExecuTorch's process-wide thread pool, as the bindings expose it."""
    from executorch.extension.pybindings import portable_lib

    return int(portable_lib._threadpool_get_thread_count())


def deserialize_flat_tensor(data: bytes):
    """The flatbuffer of a .ptd (ExecuTorch flat tensor) file: `named_data` and `segments`."""
    from executorch.extension.flat_tensor.serialize.serialize import _deserialize_to_flat_tensor

    return _deserialize_to_flat_tensor(data)


def read_xnn_cache_index(data) -> dict[str, tuple[int, int, int]]:
    """{entry name: (byte offset, nbytes, seed)} of an XNNPACK packed weight cache file's contents (bytes-like).

    Raises ValueError if the footer or an entry does not parse, so a format change is refused, not misread.

        >>> blob = bytearray(8) + b"\\x02\\x00\\x00\\x00ab" + XNN_ENTRY.pack(0, 8, 7)
        >>> blob += XNN_FOOTER.pack(8, 1, XNN_CACHE_MAGIC, XNN_CACHE_VERSION)
        >>> read_xnn_cache_index(bytes(blob))
        {'ab': (0, 8, 7)}
    """
    view = memoryview(data)
    if len(view) < XNN_FOOTER.size:
        raise ValueError("XNNPACK cache file: shorter than its footer")
    start, count, magic, version = XNN_FOOTER.unpack_from(view, len(view) - XNN_FOOTER.size)
    if magic != XNN_CACHE_MAGIC or version != XNN_CACHE_VERSION or start > len(view) - XNN_FOOTER.size:
        raise ValueError(f"XNNPACK cache file: footer magic {magic:#x} version {version} (expected "
                         f"{XNN_CACHE_MAGIC:#x} version {XNN_CACHE_VERSION}): another executorch build")
    end, at, index = len(view) - XNN_FOOTER.size, start, {}
    for _ in range(count):
        if at + 4 > end:
            raise ValueError("XNNPACK cache file: index truncated")
        (name_len,) = struct.unpack_from("<I", view, at)
        if at + 4 + name_len + XNN_ENTRY.size > end:
            raise ValueError("XNNPACK cache file: index entry truncated")
        name = bytes(view[at + 4: at + 4 + name_len]).decode("ascii", "replace")
        offset, size, seed = XNN_ENTRY.unpack_from(view, at + 4 + name_len)
        if offset + size > start:
            raise ValueError(f"XNNPACK cache file: entry {name[:16]}... lies outside the packed data")
        index[name] = (offset, size, seed)
        at += 4 + name_len + XNN_ENTRY.size
    return index
