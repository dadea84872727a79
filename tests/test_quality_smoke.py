"""benchmarks/quality.py --quick end to end: the dictionary tasks read from the shipped dictd samples, every method
trained and scored, fusion on the host and SHiRA's fused pairs through an ONNX export and Runtime.switch/generate.
Checks the result's structure, its sanity and that the device path agrees with the host, not which method wins."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from shira_edge.quality import METHODS
from shira_edge.quality.dictd import read_dictd
from shira_edge.quality.tasks import load_task, split_pairs

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "data" / "quality"


def _load_cli():
    spec = importlib.util.spec_from_file_location("quality_cli", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cli = _load_cli()


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("quality") / "q.json"
    threads = torch.get_num_threads()
    try:
        assert cli.main(["--quick", "-o", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    res["markdown"] = out.with_suffix(".md").read_text()
    return res


def test_every_method_runs_once_per_task_with_equal_trainable_parameters(result):
    for task in ("translate", "acronym"):
        assert [r["label"] for r in result["runs"] if r["task"] == task] == list(METHODS)
    assert [r["label"] for r in result["fusion"]] == list(METHODS)
    trainable = {r["label"]: r["trainable"] for r in result["runs"]}
    assert len({v for k, v in trainable.items() if k != "dora"}) == 1     # SHiRA's K = r(m+n) = LoRA's A + B
    # DoRA adds one magnitude per output row: 2 layers x (q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 64)
    assert trainable["dora"] - trainable["lora"] == 2 * 512
    assert set(result["best_lr"]) == set(METHODS)


def test_losses_are_finite_and_adapters_beat_the_unadapted_base(result):
    base = result["base"]
    for row in result["runs"]:
        assert math.isfinite(row["val"]["loss"]) and math.isfinite(row["test"]["loss"])
        assert row["test"]["loss"] < base[row["task"]]["test"]["loss"], row
        assert 0.0 <= row["test"]["exact"] <= 1.0
    for row in result["fusion"]:
        for task in ("translate", "acronym"):
            assert math.isfinite(row[task]["fused"]["loss"]) and math.isfinite(row[task]["fused_best"]["loss"])
        assert row["best_scale"] in result["plan"]["fusion_scales"]


def test_mask_overlap_follows_the_mask_definitions(result):
    overlap = {r["label"]: r["mask_overlap"] for r in result["fusion"]}
    assert overlap["lora"] is None and overlap["dora"] is None
    assert overlap["shira-wm"] == 1.0             # top-|W| of the same base: the same mask for both tasks
    assert overlap["shira-rand"] < 0.5            # seed + 100 for the second task
    assert all(0.0 <= v <= 1.0 for v in overlap.values() if v is not None)


def test_the_runtime_answers_as_the_host_does(result):
    """Fused SHiRA pairs switched into the ONNX export and decoded by generate give, example by example, the same
    verdict and the same first token as the host's teacher-forced scoring of the same deltas."""
    for task in ("translate", "acronym"):
        assert result["base_device"][task] == result["base"][task]["test"]["exact"]
    shira = [r for r in result["fusion"] if r["label"].startswith("shira-")]
    assert len(shira) == 5
    for row in shira:
        for task in ("translate", "acronym"):
            device = row[task]["device"]
            assert device["agreement_fused"] == 1.0, row["label"]
            assert device["first_token_agreement"] == 1.0, row["label"]
            assert device["fused"] == row[task]["fused"]["exact"]
    assert all("device" not in r["translate"] for r in result["fusion"] if not r["label"].startswith("shira-"))


def test_markdown_has_every_table_and_says_it_is_reduced(result):
    text = result["markdown"]
    assert text.startswith("**Reduced run**: --quick")
    for heading in ("Un-adapted model", "Test accuracy at the chosen lr", "Fusion: both adapters added",
                    "What explains the interference"):
        assert heading in text
    assert text.count("| shira-snip |") == 3


def test_dictd_samples_read_into_task_pairs():
    plain, zipped = read_dictd(SAMPLES / "freedict-eng-fra.index"), read_dictd(SAMPLES / "vera.index")
    assert not any(e.headword.startswith("00") for e in plain + zipped)      # metadata entries are skipped
    translate = {p.source: p.target for p in load_task("translate", SAMPLES)}
    assert translate["ace"] == "as" and translate["accustom"] == "avoir coutume"   # numbered senses: the first
    acronym = {p.source: p.target for p in load_task("acronym", SAMPLES)}
    assert acronym["DNS"] == "Domain Name System"                             # "(Internet, RFC ...)" cut off
    assert "ADC" not in acronym and sum(e.headword == "adc" for e in zipped) == 5   # five meanings: ambiguous


def test_splits_are_by_entry_and_seeded():
    pairs = load_task("acronym", SAMPLES)
    parts = split_pairs(pairs, seed=0, n_val=5, n_test=7)
    assert sorted(map(repr, sum(parts.values(), []))) == sorted(map(repr, pairs))
    assert (len(parts["val"]), len(parts["test"])) == (5, 7)
    assert split_pairs(pairs, seed=0, n_val=5, n_test=7) == parts != split_pairs(pairs, seed=1, n_val=5, n_test=7)
    with pytest.raises(ValueError, match="too few"):
        split_pairs(pairs, seed=0, n_val=40, n_test=40)


def test_missing_data_names_the_package_and_installs_nothing(tmp_path, capsys):
    assert cli.main(["--data-dir", str(tmp_path), "-o", str(tmp_path / "q.json")]) == 1
    err = capsys.readouterr().err
    assert "apt-get install dict-freedict-eng-fra" in err and "nothing is installed" in err
    assert list(tmp_path.iterdir()) == []


def test_a_smaller_run_is_labelled_reduced_with_what_was_cut():
    _, args = cli.parse(["--methods", "lora", "shira-wm", "--seeds", "0", "-o", "/tmp/x.json"])
    plan = cli.make_plan(args)
    assert "methods ('lora', 'shira-wm')" in plan.reduced and "seeds (0,) (full: (0, 1))" in plan.reduced
    _, args = cli.parse(["--threads", "2", "-o", "/tmp/x.json"])    # how it runs is no cut
    assert cli.make_plan(args).reduced is None


def test_each_method_sweeps_its_own_grid_unless_one_grid_is_given():
    from shira_edge.quality.study import FULL, LR_GRIDS

    assert set(LR_GRIDS) == set(METHODS) and all(len(FULL.lr_grid(m)) == 2 for m in METHODS)
    assert FULL.lr_grid("shira-wm") == (3e-3, 1e-2) and FULL.lr_grid("lora") == (1e-3, 3e-3)
    _, args = cli.parse(["--lrs", "1e-3", "3e-3", "1e-2", "-o", "/tmp/x.json"])
    plan = cli.make_plan(args)
    assert plan.lr_grid("shira-wm") == plan.lr_grid("lora") == (1e-3, 3e-3, 1e-2)
    assert "lrs (0.001, 0.003, 0.01) (full: each method's LR_GRIDS pair)" in plan.reduced


def test_the_sweep_table_marks_the_rates_outside_a_methods_grid(result):
    from shira_edge.quality.study import markdown

    res = json.loads(json.dumps(result))
    extra = dict(res["runs"][0], lr=1e-2, chosen=False)   # lora's first run, as if also trained at 1e-2
    extra["val"] = dict(extra["val"], exact=0.25, loss=1.5)
    res["runs"].append(extra)
    res["lr_grid"]["lora"] = [1e-2, 2e-2]
    text = markdown(res)
    assert "| lr 0.01 | lr 0.02 | chosen |" in text
    assert "| translate | lora | " in text and "25.0 / 1.500 |" in text
    dora = next(r for r in result["runs"] if r["label"] == "dora")
    assert f"| translate | dora | {dora['trainable']:,} | - | " in text
    assert "lr grid 0.01, 0.02 (lora); 0.02 (dora, shira-rand" in text


def test_compare_finds_the_one_shared_value_that_differs(result):
    spec = importlib.util.spec_from_file_location("quality_compare", ROOT / "benchmarks" / "quality_compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    equal, diffs = compare.compare(result, result)
    assert equal > len(result["runs"]) and diffs == []
    changed = json.loads(json.dumps(result))
    changed["fusion"][2]["acronym"]["fused"]["loss"] += 1e-6
    assert len(compare.compare(result, changed)[1]) == 1


def test_the_full_study_estimate_comes_from_measured_times(result):
    import dataclasses

    from shira_edge.quality.study import FULL, estimate_seconds

    est = estimate_seconds(result, FULL)
    longer = estimate_seconds(result, dataclasses.replace(FULL, steps=2 * FULL.steps))
    assert 0 < est["train_s"] < longer["train_s"] and est["total_s"] == pytest.approx(
        est["train_s"] + est["fusion_and_eval_s"])
    steps = sum(r["step_s_median"] for r in result["runs"])
    assert longer["train_s"] - est["train_s"] > steps   # FULL trains more runs, each FULL.steps steps longer
