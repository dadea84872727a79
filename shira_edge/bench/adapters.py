"""Random adapters for the benchmark: SHiRA and LoRA with the same number of trainable parameters, nnz = r(m+n).

No training is needed to time a switch: what matters is how many entries an adapter has and where they are. SHiRA
masks are uniformly random (the paper's "rand" mask), LoRA factors are dense random matrices. SHiRA adapters are
built as ShiraAdapter objects against an export's own base digests, so the runtime accepts them.

    >>> import numpy as np
    >>> shira_nnz((768, 3072), r=4)          # the same parameter count as a rank-4 LoRA on fc1
    15360
    >>> pos = random_positions((768, 768), nnz=6144, rng=np.random.default_rng(0))
    >>> pos.dtype, bool((np.diff(pos) > 0).all())
    (dtype('int64'), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.shira_format import ShiraAdapter, make_adapter, make_target, write_shira


def shira_nnz(shape: tuple[int, int], r: int) -> int:
    """Entries of a SHiRA adapter with as many trainable parameters as a rank-r LoRA: r * (out + in)."""
    out, inp = shape
    return min(r * (out + inp), out * inp)


def random_positions(shape: tuple[int, int], nnz: int, rng: np.random.Generator) -> np.ndarray:
    """`nnz` distinct row-major positions of a (out, in) weight, sorted (int64)."""
    return np.sort(rng.choice(shape[0] * shape[1], size=nnz, replace=False)).astype(np.int64)


@dataclass(frozen=True)
class LoraFactors:
    """W += B @ A for one weight: B (out, r), A (r, in), float32 (PEFT's lora_B / lora_A, scaling folded into B)."""

    name: str
    B: np.ndarray
    A: np.ndarray


def random_shira(name: str, weights: list[dict], r: int | None, seed: int, density: float | None = None) -> ShiraAdapter:
    """A SHiRA adapter on every given manifest weight entry, nnz = r(m+n) each (or a fixed `density` of each weight
    instead of r), small random deltas."""
    rng = np.random.default_rng(seed)
    targets = []
    for w in weights:
        shape = tuple(w["shape"])
        nnz = max(1, round(shape[0] * shape[1] * density)) if density is not None else shira_nnz(shape, r)
        targets.append(make_target(w["name"], shape, random_positions(shape, nnz, rng),
                                   rng.standard_normal(nnz, dtype=np.float32) * 0.01, base_digest=w["digest"]))
    return make_adapter(name, targets, metadata={"made_by": "shira-edge bench", "r": r, "seed": seed})


def random_lora(weights: list[dict], r: int, seed: int) -> list[LoraFactors]:
    """Rank-r LoRA factors for every given manifest weight entry."""
    rng = np.random.default_rng(seed)
    return [LoraFactors(w["name"], rng.standard_normal((w["shape"][0], r), dtype=np.float32) * 0.01,
                        rng.standard_normal((r, w["shape"][1]), dtype=np.float32) * 0.01) for w in weights]


def write_random_shira(path: Path, weights: list[dict], r: int, seed: int) -> Path:
    return write_shira(path, random_shira(Path(path).stem, weights, r, seed))


def layout_factors(weights: list[dict], factors: list[LoraFactors]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (left, right) with buffer += left @ right in the export's layout of that weight: (B, A) for "as_is"
    (out, in) buffers, (A^T, B^T) for "transposed" (in, out) ones, since (B A)^T = A^T B^T."""
    layout = {w["name"]: w["layout"] for w in weights}
    return {f.name: (f.B, f.A) if layout[f.name] == "as_is" else
            (np.ascontiguousarray(f.A.T), np.ascontiguousarray(f.B.T)) for f in factors}


def write_fused_copy(export_dir: Path, manifest: dict, dest: Path, factors: list[LoraFactors]) -> Path:
    """A copy of the export with W + B @ A written into its weight file: the fully fused model an app would ship per
    adapter (the naive way to switch is to load another one of these). Hard-to-fake check: the bytes change."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for name in {f for key, f in manifest["files"].items() if isinstance(f, str) and key in ("model", "data",
                                                                                               "program")}:
        shutil.copyfile(Path(export_dir) / name, dest / name)
    weights = patchable(manifest)
    by_name = {w["name"]: w for w in weights}
    for name, (left, right) in layout_factors(weights, factors).items():
        w = by_name[name]
        view = np.memmap(dest / w["file"], dtype="<f4", mode="r+", offset=w["offset"],
                         shape=(left.shape[0], right.shape[1]))
        view += left @ right
        view.flush()
        del view
    return dest


def patchable(manifest: dict) -> list[dict]:
    """The manifest's weight entries an adapter may target."""
    return [w for w in manifest["weights"] if w["patchable"]]
