"""The LoRA baseline of part (b): `W += B @ A` fused into the same weight buffers the shira-edge runtime patches,
then whatever the backend needs to see them, done by the runtime's own backend classes so that only the weight
update differs from SHiRA's switch.

- ONNX Runtime: an `OnnxBackend(policy="packed", in_place=False)` owns plain (unpacked) buffers; after the fusion
  it rebuilds its prepacked session (`weights_changed` + `after_scatter`): what any runtime that fuses LoRA into
  weights ORT prepacks must do. (SHiRA's packed-in-place switch writes into the packed weights instead.)
- ExecuTorch: an `ExecuTorchBackend(in_place=False)` owns a patchable copy of model.ptd; `after_scatter` reloads the
  method. (SHiRA's packed-in-place switch writes into XNNPACK's packed weights instead.)

Switching from adapter X to Y is done as one rank-2r update per weight, W += [B_y, -B_x] @ [A_y; A_x] (one pass over
W instead of unfuse-then-fuse): the cheapest LoRA switch there is, so the comparison is fair to LoRA.

    >>> lf = LoraFused("out/", read_manifest("out/"), threads=2)     # doctest: +SKIP
    >>> lf.switch(factors_x, factors_y); lf.rebuild()               # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from .adapters import LoraFactors, layout_factors, patchable


class LoraFused:
    def __init__(self, export_dir, manifest: dict, threads: int):
        if manifest["backend"] == "onnxruntime":
            from ..runtime.onnx_backend import OnnxBackend
            self.backend = OnnxBackend(export_dir, manifest, policy="packed", threads=threads, in_place=False)
        else:
            from ..runtime.executorch_backend import ExecuTorchBackend
            self.backend = ExecuTorchBackend(export_dir, manifest, threads=threads, in_place=False)
        self.weights = patchable(manifest)
        self._views = {}
        for w in self.weights:
            s = self.backend.slots[w["name"]]
            view = self.backend.flat[s.start: s.start + s.out * s.inp]
            self._views[w["name"]] = view.reshape((s.out, s.inp) if s.layout == "as_is" else (s.inp, s.out))

    def plan(self, old: list[LoraFactors] | None, new: list[LoraFactors]) -> list[tuple]:
        """Precomputed (torch buffer view, left, right) with buffer += left @ right taking `old` off and `new` on."""
        import torch

        lay_new = layout_factors(self.weights, new)
        lay_old = layout_factors(self.weights, old) if old else {}
        out = []
        for name, (left, right) in lay_new.items():
            if name in lay_old:
                ol, orr = lay_old[name]
                left, right = np.concatenate([left, ol], axis=1), np.concatenate([right, -orr], axis=0)
            out.append((torch.from_numpy(self._views[name]), torch.from_numpy(np.ascontiguousarray(left)),
                        torch.from_numpy(np.ascontiguousarray(right))))
        return out

    @staticmethod
    def fuse(plan: list[tuple]) -> None:
        for w, left, right in plan:
            w.addmm_(left, right)

    def rebuild(self) -> None:
        """Make the backend see the buffers: rebuild the prepacked session / reload the method."""
        self.backend.weights_changed()
        self.backend.after_scatter()

    def step(self, input_ids, cache):
        return self.backend.step(input_ids, cache)

    def close(self) -> None:
        self.backend.close()
