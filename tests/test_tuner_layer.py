"""The copy-free SHiRA layer computes what PEFT's SHiRA layer computes, gradients included, without an (out, in) tensor."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from shira_edge.tuner.layer import EfficientShiraLinear, to_efficient, to_peft
from shira_edge.tuner.adapt import adapter_config

OUT, IN = 12, 16


def peft_pair(mask: str, scale: float = 1.0, dtype=torch.float64):
    """(PEFT's SHiRA net, the same net on the efficient path), with random non-zero adapter values."""
    from peft import get_peft_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, OUT), nn.Tanh(), nn.Linear(OUT, 10)).to(dtype)
    config = adapter_config("shira", r=2, target_modules=["0", "2"], mask=mask, mask_seed=1, task_type=None)
    config.init_weights = False  # randn values, so that the delta matters
    reference = get_peft_model(net, config)
    for module in reference.modules():
        if hasattr(module, "shira_weight"):
            module.set_scale("default", scale)
            module.shira_weight["default"].data = module.shira_weight["default"].data.to(dtype)
    efficient = copy.deepcopy(reference)
    to_efficient(efficient)
    return reference, efficient


def run(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y.sin() * torch.arange(y.shape[-1], dtype=y.dtype)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("scale", [1.0, 0.5], ids=["scale1", "scale0.5"])
@pytest.mark.parametrize("mask", ["rand", "struct"])
def test_outputs_and_gradients_equal_peft(mask, scale):
    reference, efficient = peft_pair(mask, scale)
    x = torch.randn(3, 5, IN, dtype=torch.float64)
    y_ref, gx_ref, g_ref = run(reference, x)
    y_eff, gx_eff, g_eff = run(efficient, x)
    torch.testing.assert_close(y_eff, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx_eff, gx_ref, rtol=0, atol=1e-12)
    assert g_ref.keys() == g_eff.keys() and len(g_ref) == 2
    for name in g_ref:
        torch.testing.assert_close(g_eff[name], g_ref[name], rtol=1e-12, atol=1e-12)


def test_float32_gradients_match_peft_closely():
    reference, efficient = peft_pair("rand", dtype=torch.float32)
    x = torch.randn(4, IN)
    for (a, b) in zip(run(reference, x)[2].values(), run(efficient, x)[2].values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_base_weight_is_restored_bit_for_bit():
    reference, efficient = peft_pair("rand", dtype=torch.float32)
    before = [m.get_base_layer().weight.clone() for m in efficient.modules() if isinstance(m, EfficientShiraLinear)]
    run(efficient, torch.randn(4, IN))
    after = [m.get_base_layer().weight for m in efficient.modules() if isinstance(m, EfficientShiraLinear)]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and len(before) == 2


class ShapeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.shapes.add(tuple(t.shape))
        return out


def dense_shapes_made(model) -> set:
    log = ShapeLog()
    with log:
        run(model, torch.randn(4, IN))
    return log.shapes & {(OUT, IN), (10, OUT)}


def test_no_dense_weight_sized_tensor_is_made_in_forward_or_backward():
    reference, efficient = peft_pair("rand", dtype=torch.float32)
    assert dense_shapes_made(reference)  # PEFT's forward clones the weight: the probe sees it
    assert dense_shapes_made(efficient) == set()


def test_to_peft_restores_peft_state_and_merge_works():
    reference, efficient = peft_pair("struct", dtype=torch.float32)
    layers = to_peft(efficient)
    assert len(layers) == 2 and all(type(m) is not EfficientShiraLinear for m in layers)
    for ref, got in zip([m for m in reference.modules() if hasattr(m, "shira_indices")], layers):
        assert torch.equal(got.shira_indices["default"], ref.shira_indices["default"])
        assert got.shira_indices["default"].dtype == ref.shira_indices["default"].dtype
    x = torch.randn(4, IN)
    merged = copy.deepcopy(reference).merge_and_unload()
    torch.testing.assert_close(merged(x), reference(x))
    # Merging straight from the efficient path works too (it rebuilds PEFT's indices on demand).
    _, efficient = peft_pair("struct", dtype=torch.float32)
    torch.testing.assert_close(efficient.merge_and_unload()(x), reference(x))


def test_disabled_adapter_falls_back_to_the_base_layer():
    reference, efficient = peft_pair("rand", dtype=torch.float32)
    x = torch.randn(4, IN)
    with efficient.disable_adapter(), reference.disable_adapter():
        torch.testing.assert_close(efficient(x), reference(x))
        torch.testing.assert_close(efficient(x), reference.get_base_model()(x))
