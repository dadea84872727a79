"""benchmarks/quality_tiny.py (the earlier tiny-model study) end to end at toy size: real stdlib corpora, real
pre-training, every method through train_adapter, fusion. Checks the result's structure and its sanity, not which
method wins."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_quality():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality_tiny.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


quality = _load_quality()

TOY = quality.Size(hidden=32, ffn=64, layers=2, heads=4, seq_len=32, pretrain_steps=20, pretrain_batch=8,
                   steps=15, batch=4, r=4, lrs=(1e-2,), seeds=(0,), eval_blocks=6, code_chars=20_000,
                   doc_chars=10_000, calib_batches=1)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import torch

    corpora = quality.build_corpora(TOY.code_chars, TOY.doc_chars)
    corpora["task2"] = corpora["task2"][:12]  # fewer reference topics: faster tokenizing per run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs; two threads only contend on a shared 2-core machine
    try:
        return quality.run_quality(TOY, corpora, tmp_path_factory.mktemp("quality"), progress=lambda _: None)
    finally:
        torch.set_num_threads(threads)


def test_every_method_runs_once_per_task_with_equal_trainable_parameters(result):
    labels = [quality.label(m, k) for m, k in quality.METHODS]
    assert [r["label"] for r in result["sweep"] if r["task"] == "task1"] == labels
    assert sorted(r["label"] for r in result["sweep"] if r["task"] == "task2") == sorted(labels)
    assert [r["label"] for r in result["fusion"]] == labels
    assert len({r["trainable"] for r in result["sweep"]}) == 1
    assert set(result["best_lr"]) == set(labels)


def test_losses_are_finite_and_adapters_beat_the_unadapted_base(result):
    base = result["base_loss"]
    for row in result["sweep"]:
        assert math.isfinite(row["val_loss"]) and math.isfinite(row["test_loss"])
        assert row["test_loss"] < base[row["task"]]["test"], row
    for row in result["fusion"]:
        for key in ("task1_alone", "task1_fused", "task2_alone", "task2_fused"):
            assert math.isfinite(row[key])
        assert row["task1_alone"] < base["task1"]["test"] and row["task2_alone"] < base["task2"]["test"]


def test_mask_overlap_follows_the_mask_definitions(result):
    overlap = {r["label"]: r["mask_overlap"] for r in result["fusion"]}
    assert overlap["lora"] is None
    assert overlap["shira-wm"] == 1.0             # top-|W| of the same base: the same mask for both tasks
    assert overlap["shira-rand"] < 0.5            # different seeds per task
    assert all(0.0 <= v <= 1.0 for v in overlap.values() if v is not None)


def test_markdown_has_every_table(result):
    text = quality.markdown(result)
    for heading in ("Learning-rate sweep", "Held-out test loss", "Fusion"):
        assert heading in text
    assert text.count("| shira-snip |") == 3


def test_documents_are_split_without_overlap():
    docs = [f"doc {i}" for i in range(25)]
    parts = quality.split_documents(docs, seed=0)
    assert sorted(sum(parts.values(), [])) == sorted(docs)
    assert len(parts["val"]) == len(parts["test"]) == 2
    with pytest.raises(ValueError, match="too few"):
        quality.split_documents(docs[:2], seed=0)
