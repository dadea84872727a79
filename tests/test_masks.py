"""Each SHiRA mask selects exactly r(m+n) entries, has its defining property, is deterministic, and plugs into PEFT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shira_edge.tuner.masks import MASKS, gradient_scores, make_mask_fn, max_rank, top_k_mask
from shira_edge.tuner.adapt import adapter_config

OUT, IN, R = 10, 12, 2
K = R * (OUT + IN)  # 44 of 120


def small_layer(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT)


def fake_grads(layer: nn.Linear, seed: int = 1) -> dict:
    torch.manual_seed(seed)
    return {layer: torch.randn_like(layer.weight)}


def build(kind: str, layer: nn.Linear, seed: int = 0) -> torch.Tensor:
    grads = fake_grads(layer) if kind in ("grad", "snip") else None
    return make_mask_fn(kind, seed=seed, grads=grads)(layer, R)


def assert_top_k(mask: torch.Tensor, score: torch.Tensor) -> None:
    chosen, rest = score[mask.bool()], score[~mask.bool()]
    assert chosen.min() >= rest.max()


@pytest.mark.parametrize("kind", MASKS)
def test_mask_selects_exactly_k_binary_entries_like_the_weight(kind):
    layer = small_layer()
    mask = build(kind, layer)
    assert mask.shape == layer.weight.shape
    assert mask.dtype == layer.weight.dtype and mask.device == layer.weight.device
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert int(mask.sum()) == K


@pytest.mark.parametrize("kind", MASKS)
def test_mask_is_deterministic(kind):
    assert torch.equal(build(kind, small_layer()), build(kind, small_layer()))


def test_rand_is_peft_random_mask():
    from peft.tuners.shira.mask_functions import random_mask

    layer = small_layer()
    assert torch.equal(build("rand", layer, seed=7).bool(), random_mask(layer, R, random_seed=7).bool())
    assert not torch.equal(build("rand", layer, seed=7), build("rand", layer, seed=8))


def test_wm_keeps_the_largest_magnitudes():
    layer = small_layer()
    assert_top_k(build("wm", layer), layer.weight.detach().abs())


def test_grad_keeps_the_largest_gradient_magnitudes():
    layer = small_layer()
    assert_top_k(build("grad", layer), fake_grads(layer)[layer].abs())


def test_snip_keeps_the_largest_weight_times_gradient():
    layer = small_layer()
    score = (layer.weight.detach() * fake_grads(layer)[layer]).abs()
    mask = build("snip", layer)
    assert_top_k(mask, score)
    # Not a relabelled wm or grad: on this layer the three top-K sets differ.
    assert not torch.equal(mask, build("wm", layer)) and not torch.equal(mask, build("grad", layer))


def test_struct_is_the_diagonal_plus_whole_rows_and_columns():
    layer = small_layer()
    mask = build("struct", layer, seed=3).bool()
    diag = torch.arange(min(OUT, IN))
    assert mask[diag, diag].all()
    full_rows = mask.all(dim=1)
    full_cols = mask.all(dim=0)
    assert full_rows.sum() >= R and full_cols.sum() >= R - 1
    covered = full_rows[:, None] | full_cols[None, :]
    covered[diag, diag] = True
    leftover = mask & ~covered
    # Whatever full lines and the diagonal do not explain lies on one more (partial) row or column.
    rows_left, cols_left = leftover.nonzero(as_tuple=True)
    assert len(rows_left) == 0 or len(rows_left.unique()) == 1 or len(cols_left.unique()) == 1
    assert not torch.equal(mask, build("struct", layer, seed=4).bool())


def test_ties_go_to_the_lower_flat_index():
    score = torch.zeros(4, 5)
    score[3, 4] = 1.0
    chosen = top_k_mask(score, 3).flatten().nonzero().flatten().tolist()
    assert chosen == [0, 1, 19]


def test_max_rank_is_the_largest_r_that_fits():
    r = max_rank(OUT, IN)
    assert r * (OUT + IN) <= OUT * IN < (r + 1) * (OUT + IN)


def test_gradient_scores_are_dl_dw_summed_over_batches():
    from tests.conftest import make_tiny_opt

    model = make_tiny_opt()
    layer = model.model.decoder.layers[0].self_attn.q_proj
    batches = [torch.randint(4, 500, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model.requires_grad_(False)
    model.model.decoder.final_layer_norm.weight.requires_grad_(True)  # some state to give back unchanged
    scores = gradient_scores(model, {"q": layer}, batches)[layer]

    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.decoder.final_layer_norm.weight"]
    assert all(p.grad is None for p in model.parameters())
    weight = layer.weight
    weight.requires_grad_(True)
    expected = sum(torch.autograd.grad(model(input_ids=b, labels=b).loss, weight)[0] for b in batches)
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("kind", MASKS)
def test_mask_plugs_into_peft_through_mask_fn(kind):
    from peft import get_peft_model

    net = nn.Sequential(small_layer())
    grads = fake_grads(net[0]) if kind in ("grad", "snip") else None
    expected = make_mask_fn(kind, seed=5, grads=grads)(net[0], R)
    config = adapter_config("shira", r=R, target_modules=["0"], mask=kind, mask_seed=5, grads=grads,
                            task_type=None)
    layer = get_peft_model(net, config).base_model.model[0]
    rows, cols = layer.shira_indices["default"].long()
    got = torch.zeros(OUT, IN)
    got[rows, cols] = 1.0
    assert torch.equal(got, expected)
    assert config.mask_type == ("random" if kind == "rand" else kind) and config.random_seed == 5
