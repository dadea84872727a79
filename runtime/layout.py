"""Where a PyTorch weight element lives in a backend's buffer: the one mapping every backend and exporter uses.

Three steps, each a plain function of the slot (runtime/patch.py `Slot`) so that slices, permutations, transposes
and packed layouts compose in one place:

1. PyTorch W[r, c] (the (out, in) nn.Linear weight) -> element (i, j) of the backend tensor T as stored, row-major
   with shape `slot.tensor_shape` = (R, C). With o = out_offset + row_perm[r] (row_perm None: o = out_offset + r):
   layout "as_is" -> (o, c); layout "transposed" -> (c, o). Element index e = i * C + j. This is how the manifest
   weight map describes slices of fused tensors (qkv_proj, gate_up_proj) and converter permutations (RoPE).
2. Element e of T -> offset inside the tensor's bytes in the backend buffer: `slot.packing.positions(e)`. `packing`
   None means T is stored as is (offset = e). A packed layout is any object with `positions(e)` and its inverse
   `elements(offset)` (-1 for padding) over int64 arrays, and `size` (floats in the packed tensor): the ONNX backend
   uses `MlasPackedB` (MLAS packed-B, the closed form) or a `TablePacking` probed on this machine; the ExecuTorch
   backend can pass a `TablePacking` built from its own probe of XNNPACK's packed layout.
3. + `slot.start`: where the tensor begins in the backend's flat float32 buffer.

    >>> import numpy as np
    >>> from shira_edge.runtime.patch import Slot
    >>> qkv = dict(inp=3, layout="as_is", start=100, file=None, offset=0, digest="", patchable=True)
    >>> k = Slot("k_proj.weight", out=2, **qkv, tensor_shape=(6, 3), out_offset=2)   # rows 2-3 of a fused (6, 3)
    >>> buffer_positions(k, np.array([0, 5]))          # W[0,0] -> T[2,0] = 6, W[1,2] -> T[3,2] = 11, + start
    array([106, 111])
    >>> t = Slot("w", out=2, inp=3, layout="transposed", start=0, file=None, offset=0, digest="", patchable=True)
    >>> buffer_positions(t, np.array([1, 5]))          # W[0,1] -> T[1,0] = 2, W[1,2] -> T[2,1] = 5
    array([2, 5])
    >>> file_elements(t, np.array([2, 5]))             # back to elements of T (what read_base reads from the file)
    array([2, 5])
    >>> p = MlasPackedB(k=3, n=2)                      # K=3 rows of 2 outputs, padded to a 16-wide panel
    >>> p.positions(np.array([0, 1, 2])), p.size       # T[0,0] -> 0, T[0,1] -> 1, T[1,0] -> 16
    (array([ 0,  1, 16]), 48)
"""

from __future__ import annotations

import numpy as np

MLAS_STRIDE_K = 256      # MLAS_SGEMM_PACKED_STRIDEK (sgemm.cpp): K is packed in blocks of this many rows
MLAS_PANEL = 16          # packed-B panels are 16 outputs wide; N is padded up to a multiple of it


def tensor_shape(slot) -> tuple[int, int]:
    """(R, C) of the backend tensor as stored (default: the PyTorch shape, reversed when transposed)."""
    if slot.tensor_shape is not None:
        return tuple(slot.tensor_shape)
    return (slot.out, slot.inp) if slot.layout == "as_is" else (slot.inp, slot.out)


def tensor_elements(slot, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """PyTorch (row, col) -> row-major element index in the backend tensor T (step 1 above), int64."""
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    o = slot.out_offset + (rows if slot.row_perm is None else np.asarray(slot.row_perm, np.int64)[rows])
    width = tensor_shape(slot)[1]
    return o * width + cols if slot.layout == "as_is" else cols * width + o


def buffer_positions(slot, flat_indices: np.ndarray) -> np.ndarray:
    """Row-major (out, in) flat indices of the PyTorch weight -> positions in the backend's flat buffer (int64, same
    order as given): steps 1-3 above."""
    rows, cols = np.divmod(np.asarray(flat_indices, np.int64), slot.inp)
    elements = tensor_elements(slot, rows, cols)
    offsets = elements if slot.packing is None else np.asarray(slot.packing.positions(elements), np.int64)
    return offsets + slot.start


def file_elements(slot, positions: np.ndarray) -> np.ndarray:
    """Inverse of steps 2-3: buffer positions -> element indices of T (as stored in the export's file)."""
    offsets = np.asarray(positions, np.int64) - slot.start
    return offsets if slot.packing is None else np.asarray(slot.packing.elements(offsets), np.int64)


class MlasPackedB:
    """MLAS's packed-B layout for a (K, N) row-major B (MlasSgemmCopyPackB, x86-64): blocks of 256 rows of K; inside
    a block, 16-wide panels of N one after another, each CountK x 16 row-major; N padded to a multiple of 16.

    off(k, n) = 256*AN*(k//256) + 16*(n//16)*CountK + 16*(k%256) + n%16, CountK = min(256, K - 256*(k//256)).
    Used only where a probe on this machine found exactly this layout (onnx_packed.probe_layout).
    """

    def __init__(self, k: int, n: int):
        self.k, self.n = int(k), int(n)
        self.padded_n = -(-self.n // MLAS_PANEL) * MLAS_PANEL
        self.size = self.k * self.padded_n

    def positions(self, elements: np.ndarray) -> np.ndarray:
        k, n = np.divmod(np.asarray(elements, np.int64), self.n)
        block, kk = np.divmod(k, MLAS_STRIDE_K)
        count_k = np.minimum(MLAS_STRIDE_K, self.k - MLAS_STRIDE_K * block)
        return (MLAS_STRIDE_K * self.padded_n * block + MLAS_PANEL * (n // MLAS_PANEL) * count_k
                + MLAS_PANEL * kk + n % MLAS_PANEL)

    def elements(self, offsets: np.ndarray) -> np.ndarray:
        block, q = np.divmod(np.asarray(offsets, np.int64), MLAS_STRIDE_K * self.padded_n)
        count_k = np.minimum(MLAS_STRIDE_K, self.k - MLAS_STRIDE_K * block)
        panel, r = np.divmod(q, MLAS_PANEL * count_k)
        kk, nn = np.divmod(r, MLAS_PANEL)
        n = MLAS_PANEL * panel + nn
        return np.where(n < self.n, (MLAS_STRIDE_K * block + kk) * self.n + n, -1)


class TablePacking:
    """A packed layout given as a table: `table[e]` = offset of element e inside the packed tensor of `size` floats
    (offsets not in the table are padding). Build it from a probe: pack a tensor whose element e holds a value that
    names e, and read where each value landed."""

    def __init__(self, table: np.ndarray, size: int):
        table = np.asarray(table, np.int64)
        if table.ndim != 1 or (table.size and (table.min() < 0 or table.max() >= size)):
            raise ValueError(f"a packing table maps elements to offsets in [0, {size})")
        inverse = np.full(int(size), -1, np.int64)
        inverse[table] = np.arange(table.size)
        if np.count_nonzero(inverse >= 0) != table.size:
            raise ValueError("a packing table must send every element to its own offset")
        self.table, self.inverse, self.size = table, inverse, int(size)

    def positions(self, elements: np.ndarray) -> np.ndarray:
        return self.table[np.asarray(elements, np.int64)]

    def elements(self, offsets: np.ndarray) -> np.ndarray:
        return self.inverse[np.asarray(offsets, np.int64)]
