"""The native ExecuTorch runner (native/shira_et.cpp) through ctypes: built on first use, cached per user.

The Python bindings cannot pass per-load backend options, and XNNPACK's file-backed weight cache needs two of them
(`weight_cache_enabled`, `packed_cache_path`); the runner is a small C API over the executorch wheel's own headers
and libraries that can. It takes tokens and returns logits as numpy buffers, so this path never loads torch.

Build: `g++` compiles native/shira_et.cpp against `executorch/include` and links `executorch/lib` of the installed
wheel, with an rpath to it; runtime/native_build.py caches it, keyed by the source, the command and the executorch
version.

    >>> lib = library()                                  # doctest: +SKIP
    >>> program = NativeProgram(lib, "out/model.pte", "out/model.ptd", cache_path="", vocab=50272)  # doctest: +SKIP
    >>> program.forward(np.array([2, 100, 7]), start=0).shape                                      # doctest: +SKIP
    (1, 3, 50272)
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from pathlib import Path

import numpy as np

from . import native_build
from .native_build import NativeUnavailable  # noqa: F401  (callers catch it as et_native.NativeUnavailable)

SOURCE = native_build.NATIVE_DIR / "shira_et.cpp"
LIBS = ["executorch", "executorch_backend_xnnpack", "executorch_kernels_optimized", "executorch_threadpool"]
ERR_LEN = 512


def _executorch_dir() -> Path:
    spec = importlib.util.find_spec("executorch")   # finds the package without importing it (nor torch)
    if spec is None or not spec.submodule_search_locations:
        raise NativeUnavailable("executorch is not installed; install the project (make install)")
    return Path(list(spec.submodule_search_locations)[0])


def build_command(out: Path) -> list[str]:
    et = _executorch_dir()
    include, lib = et / "include", et / "lib"
    return ["g++", "-std=c++17", "-O2", "-fPIC", "-shared", "-Wno-deprecated-declarations",
            "-DC10_USING_CUSTOM_GENERATED_MACROS",   # the wheel ships c10 headers without their generated macros
            f"-I{include}", f"-I{include / 'executorch/runtime/core/portable_type/c10'}",
            str(SOURCE), "-o", str(out), f"-L{lib}", "-Wl,--no-as-needed",   # the backend and kernels register
            *[f"-l{name}" for name in LIBS], f"-Wl,-rpath,{lib}"]             # themselves when loaded: keep them


def library_path() -> Path:
    """Where the library for this source + executorch + build command lives (built or not)."""
    from .et_compat import installed_version

    return native_build.library_path(SOURCE, "libshira_et", build_command, key=installed_version())


_LIB = None
_LIB_LOCK = threading.Lock()


def library() -> ctypes.CDLL:
    """The native runner, built if needed and loaded once per process. Raises NativeUnavailable."""
    global _LIB
    with _LIB_LOCK:
        if _LIB is None:
            path = library_path()
            if not path.is_file():
                native_build.build(path, SOURCE, build_command)
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as exc:
                raise NativeUnavailable(f"{path}: cannot be loaded ({exc}); delete it to rebuild") from None
            lib.shira_et_load.restype = ctypes.c_void_p
            lib.shira_et_load.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                          ctypes.c_int]
            lib.shira_et_forward.restype = ctypes.c_int
            lib.shira_et_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                             ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p, ctypes.c_int]
            lib.shira_et_free.argtypes = [ctypes.c_void_p]
            lib.shira_et_set_threads.argtypes = [ctypes.c_int]
            lib.shira_et_set_threads.restype = ctypes.c_int
            lib.shira_et_threads.restype = ctypes.c_int
            lib.shira_et_get_default_weight_cache.argtypes = [ctypes.POINTER(ctypes.c_int)]
            _quiet_logs(lib)
            _LIB = lib
        return _LIB


_KERNELS_LOADED = False


def load_llm_kernels() -> None:
    """Register et_compat.LLM_KERNELS in this process, once: for programs whose manifest lists them, before loading.

    Their library brings the Python bindings' native module, which installs its own log sink when it loads: so
    the runner's quiet sink is installed (again) after it. Raises NativeUnavailable naming the library."""
    global _KERNELS_LOADED
    from .et_compat import EXECUTORCH_VERSION, LLM_KERNELS, LLM_KERNELS_LIBRARY

    with _LIB_LOCK:
        if _KERNELS_LOADED:
            return
        path = _executorch_dir() / LLM_KERNELS_LIBRARY
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise NativeUnavailable(f"{path}: cannot load ExecuTorch's LLM kernels ({exc}), which this program "
                                    f"calls ({', '.join(LLM_KERNELS)}); reinstall executorch {EXECUTORCH_VERSION} "
                                    f"(make install)") from None
        _KERNELS_LOADED = True
        if _LIB is not None:
            _quiet_logs(_LIB)


def _quiet_logs(lib) -> None:
    """Install the runner's errors-only log sink. Over the sink the kernels' library installed, ExecuTorch says so
    in one line on stderr ("register_pal() called multiple times"): fd 2 points at /dev/null for that one call, so
    a user sees no start-up noise."""
    if not _KERNELS_LOADED:
        lib.shira_et_quiet_logs()
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            lib.shira_et_quiet_logs()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def default_weight_cache(lib) -> bool:
    """Whether XNNPACK uses its weight cache for loads that do not ask (the Python bindings' loads)."""
    enabled = ctypes.c_int(0)
    if lib.shira_et_get_default_weight_cache(ctypes.byref(enabled)) != 0:
        raise NativeUnavailable("XNNPACK does not report its weight_cache_enabled option")
    return bool(enabled.value)


def set_threads(lib, threads: int | None) -> None:
    """Size ExecuTorch's process-wide thread pool (shared with the Python bindings) before loading a program.

    Resizing destroys the pool that every loaded XNNPACK program points to, so it happens only when the size
    differs, and is refused (ValueError) while programs are loaded: this runner counts its own; programs the Python
    bindings loaded are not seen, so size the pool before loading any (the bench does, with its --threads)."""
    if threads and lib.shira_et_set_threads(int(threads)) != int(threads):
        raise ValueError(f"threads={threads}: ExecuTorch's thread pool is process-wide and has "
                         f"{lib.shira_et_threads()} threads, in use by programs loaded in this process; resizing it "
                         f"under them is unsafe. Pass threads={lib.shira_et_threads()} or None, or set it before "
                         f"loading the first program")


class NativeProgram:
    """`forward` of one .pte + .ptd, loaded by the native runner; cache_path "" packs on XNNPACK's heap."""

    def __init__(self, lib, pte, ptd, *, cache_path: str, vocab: int):
        self._lib, self.vocab = lib, int(vocab)
        err = ctypes.create_string_buffer(ERR_LEN)
        self._handle = lib.shira_et_load(str(pte).encode(), str(ptd).encode(), cache_path.encode(), err, ERR_LEN)
        if not self._handle:
            raise NativeUnavailable(err.value.decode(errors="replace") or f"{pte}: the native runner cannot load it")

    def forward(self, tokens: np.ndarray, start: int) -> np.ndarray:
        """Logits [1, n, vocab] of tokens [n] (or [1, n]) at positions start.. through the program's static cache."""
        ids = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        out = np.empty((1, ids.size, self.vocab), np.float32)
        err = ctypes.create_string_buffer(ERR_LEN)
        if self._lib.shira_et_forward(self._handle, ids.ctypes.data, ids.size, int(start), out.ctypes.data,
                                      self.vocab, err, ERR_LEN) != 0:
            raise RuntimeError(err.value.decode(errors="replace"))
        return out

    def close(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self._lib.shira_et_free(handle)

    def __del__(self):
        self.close()
