"""A SHiRA linear layer that trains without copying its base weight.

PEFT's `shira.Linear.forward` clones the whole base weight on every call and adds the sparse delta to the copy;
autograd then keeps that copy alive until backward and builds a dense (out, in) gradient for it. Here the K
trainable values are written into the base weight in place for the one matmul that needs them, and the K
original entries are put back right after (copied back, not subtracted, so the base weight is restored bit for
bit). Nothing of size out x in is allocated:

    forward   y      = x (W + S)^T + b                   one dense matmul, W patched in place
    backward  dL/dx  = dL/dy (W + S)                     one dense matmul, W patched in place
              dL/dv  = scale * (dL/dy^T x)[rows, cols]   sampled at the K indices (torch.sparse.sampled_addmm)

The indices are kept as a compressed-row pattern (int32 row pointers and column indices, 4 bytes per value
instead of PEFT's 8). `to_efficient` swaps the class of PEFT's SHiRA layers in place; `to_peft` rebuilds PEFT's
own `shira_indices` and class, so `save_pretrained` writes PEFT's format.

    >>> import torch
    >>> from peft import ShiraConfig, get_peft_model
    >>> from shira_edge.tuner.layer import to_efficient, to_peft
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    >>> peft_model = get_peft_model(net, ShiraConfig(r=1, target_modules=["0"], random_seed=0))
    >>> layers = to_efficient(peft_model)
    >>> y = peft_model(torch.randn(3, 8)); y.sum().backward()
    >>> _ = to_peft(peft_model)
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from peft.tuners.shira.layer import Linear as PeftShiraLinear

# The CSR pattern below is only a carrier for the sampled product; the beta notice would print every step.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def csr_pattern(indices: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (2, K) row-major [rows; cols] -> (row pointers, column indices), both int32."""
    rows, cols = indices[0].long(), indices[1]
    counts = torch.bincount(rows, minlength=out_features)
    crow = torch.zeros(out_features + 1, dtype=torch.int32, device=indices.device)
    crow[1:] = counts.cumsum(0)
    return crow, cols.to(torch.int32)


def pattern_rows(crow: torch.Tensor) -> torch.Tensor:
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(counts), device=crow.device), counts)


def flat_indices(crow: torch.Tensor, col: torch.Tensor, in_features: int) -> torch.Tensor:
    return pattern_rows(crow) * in_features + col.long()


@contextmanager
def patched(weight: torch.Tensor, flat_idx: torch.Tensor, delta: torch.Tensor):
    """W[idx] += delta for the duration of the block; the original entries are copied back afterwards."""
    flat = weight.view(-1)
    with torch.no_grad():
        original = flat.index_select(0, flat_idx)  # index_select / scatter_: the fastest gather / scatter on CPU
        flat.scatter_(0, flat_idx, original + delta.to(weight.dtype))
    try:
        yield weight
    finally:
        with torch.no_grad():
            flat.scatter_(0, flat_idx, original)


class SparseDeltaLinear(torch.autograd.Function):
    """y = x (W + scale * S(values))^T + b with gradients for x and the K values only."""

    @staticmethod
    def forward(ctx, x, values, weight, bias, crow, col, scale):
        flat_idx = flat_indices(crow, col, weight.shape[1])
        with patched(weight, flat_idx, values * scale):
            y = torch.nn.functional.linear(x, weight, bias)
        ctx.save_for_backward(x, values, crow, col)
        ctx.weight, ctx.scale = weight, scale
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, values, crow, col = ctx.saved_tensors
        weight, scale = ctx.weight, ctx.scale
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            with patched(weight, flat_indices(crow, col, weight.shape[1]), values * scale):
                grad_x = grad_y @ weight
        if ctx.needs_input_grad[1]:
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(values.dtype)
            xs = x.reshape(-1, x.shape[-1]).to(values.dtype)
            # sampled_addmm reads the pattern's values even with beta=0 (NaN would leak through): pass zeros.
            pattern = torch.sparse_csr_tensor(crow, col, torch.zeros_like(values), weight.shape,
                                              check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, g.t(), xs, beta=0.0).values() * scale
        return grad_x, grad_values, None, None, None, None, None


class EfficientShiraLinear(PeftShiraLinear):
    """PEFT's SHiRA Linear with a forward that never copies the base weight (see the module docstring)."""

    shira_pattern: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def _can_patch(self) -> bool:
        base = self.get_base_layer()
        active = [a for a in self.active_adapters if a in self.shira_weight]
        return (
            not self.disable_adapters and not self.merged and len(active) == 1
            and self.quantization_backend is None and isinstance(base, torch.nn.Linear)
            and base.weight.is_contiguous() and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._can_patch():
            self._restore_indices()
            return super().forward(x, *args, **kwargs)
        adapter = next(a for a in self.active_adapters if a in self.shira_weight)
        base = self.get_base_layer()
        crow, col = self.shira_pattern[adapter]
        values = self.shira_weight[adapter]
        return SparseDeltaLinear.apply(x.to(base.weight.dtype), values, base.weight, base.bias, crow, col,
                                       float(self.scaling[adapter]))

    def get_delta_weight(self, adapter) -> torch.Tensor:
        self._restore_indices()  # merge/unmerge go through here and need PEFT's indices
        return super().get_delta_weight(adapter)

    def _pack_indices(self) -> None:
        """Keep the indices as an int32 compressed-row pattern and drop PEFT's (2, K) copy."""
        self.shira_pattern = getattr(self, "shira_pattern", {})
        for adapter, indices in list(self.shira_indices.items()):
            self.shira_pattern[adapter] = csr_pattern(indices.to(self.shira_weight[adapter].device),
                                                      self.out_features)
            del self.shira_indices[adapter]

    def _restore_indices(self) -> None:
        for adapter, (crow, col) in getattr(self, "shira_pattern", {}).items():
            if adapter not in self.shira_indices:
                self.shira_indices[adapter] = torch.stack([pattern_rows(crow), col.long()]).to(torch.int)


def to_efficient(model: torch.nn.Module) -> list[EfficientShiraLinear]:
    """Switch every PEFT SHiRA Linear in `model` to the copy-free training path, in place."""
    layers = []
    for module in model.modules():
        if isinstance(module, PeftShiraLinear):
            module.__class__ = EfficientShiraLinear
            module._pack_indices()
            layers.append(module)
    return layers


def to_peft(model: torch.nn.Module) -> list[PeftShiraLinear]:
    """Undo `to_efficient`: PEFT's class and `shira_indices` again, ready for save_pretrained or merging."""
    layers = []
    for module in model.modules():
        if isinstance(module, EfficientShiraLinear):
            module._restore_indices()
            del module.shira_pattern
            module.__class__ = PeftShiraLinear
            layers.append(module)
    return layers
