"""`shira-edge pack` and `shira-edge inspect` on real PEFT SHiRA adapters made for the tiny OPT."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from shira_edge.cli import main
from shira_edge.runtime.fingerprint import base_fingerprint, weight_digest
from shira_edge.runtime.shira_format import encode_shira, make_adapter, make_target, read_shira, write_shira
from tests.conftest import make_tiny_opt

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
Q0 = "model.decoder.layers.0.self_attn.q_proj"
FC1 = "base_model.model.model.decoder.layers.0.fc1"


def top_abs_mask(base_layer, r, **kwargs):
    """A custom mask_fn: the r*(out+in) weights of largest magnitude (a stand-in for a 'smart' mask)."""
    import torch

    w = base_layer.weight
    mask = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
    mask[torch.topk(w.detach().abs().flatten(), r * sum(w.shape)).indices] = 1
    return mask.view_as(w)


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory):
    """{mask: (adapter dir, {base weight name: PEFT's get_delta_weight(...).to_dense() as numpy})}."""
    import torch
    from peft import ShiraConfig, get_peft_model
    from peft.tuners.shira.layer import ShiraLayer

    made = {}
    for mask in ("random", "top_abs"):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns that mask_type "top_abs" needs a mask_fn: we set one
            config = ShiraConfig(r=2, target_modules=TARGETS, init_weights=False, random_seed=3, mask_type=mask)
            if mask == "top_abs":
                config.mask_fn = top_abs_mask
            peft_model = get_peft_model(make_tiny_opt(seed=0), config)
        deltas = {
            name.removeprefix("base_model.model.") + ".weight":
                module.get_delta_weight("default").detach().to_dense().numpy()
            for name, module in peft_model.named_modules() if isinstance(module, ShiraLayer)
        }
        path = tmp_path_factory.mktemp(f"shira-{mask}")
        peft_model.save_pretrained(path)
        made[mask] = (path, deltas)
    return made


@pytest.fixture(scope="session")
def base_weights():
    return {k: v.numpy() for k, v in make_tiny_opt(seed=0).state_dict().items()}


def pack(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["pack", *map(str, args)])
    return result.exit_code, result.output


def copy_adapter(src: Path, dst: Path, edit=None, config_edit=None) -> Path:
    """A copy of an adapter dir, its tensors and config optionally edited (to make broken adapters)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    if edit:
        tensors = load_file(str(dst / "adapter_model.safetensors"))
        edit(tensors)
        save_file(tensors, str(dst / "adapter_model.safetensors"))
    if config_edit:
        config = json.loads((dst / "adapter_config.json").read_text())
        config_edit(config)
        (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


# ------------------------------------------------------------------ the deltas are PEFT's, exactly


@pytest.mark.parametrize("mask", ["random", "top_abs"])
def test_packed_delta_equals_peft_get_delta_weight_at_fp32(peft_adapters, base_weights, mask, tmp_path):
    adapter_dir, deltas = peft_adapters[mask]
    code, output = pack(adapter_dir, "-o", tmp_path / "a.shira", "--model", "tiny-opt")
    assert code == 0, output
    assert re.search(r"packed 12 targets, [\d,]+ nnz \([\d.]+% density\), fp32: [\d,]+ bytes, [\d.]+ bytes/param",
                     output)
    adapter = read_shira(tmp_path / "a.shira")
    assert sorted(adapter.targets) == sorted(deltas) and len(deltas) == 12
    for name, target in adapter.targets.items():
        assert np.array_equal(target.dense_delta(), deltas[name]), name
        assert target.base_digest == weight_digest(base_weights[name])
    fingerprint = base_fingerprint({n: (base_weights[n].shape, weight_digest(base_weights[n])) for n in deltas})
    assert adapter.base_model == {"name": "tiny-opt", "fingerprint": fingerprint}
    assert adapter.metadata["base_weights"] == "random-init" and adapter.metadata["base_seed"] == 0
    assert adapter.metadata["mask_type"] == mask


def test_custom_mask_survives_packing(peft_adapters, base_weights, tmp_path):
    # The top-|W| mask picks different positions than the random one; the packed indices are exactly those.
    pack(peft_adapters["top_abs"][0], "-o", tmp_path / "a.shira", "--model", "tiny-opt")
    target = read_shira(tmp_path / "a.shira").targets[Q0 + ".weight"]
    w = np.abs(base_weights[Q0 + ".weight"]).ravel()
    assert target.indices.tolist() == sorted(np.argsort(-w, kind="stable")[: 2 * (32 + 32)].tolist())


def test_pack_is_deterministic_and_order_free(peft_adapters, tmp_path):
    src = peft_adapters["random"][0]

    def shuffle_and_float(tensors):  # entries in another order, indices as float32 (as PEFT saves on Windows)
        rng = np.random.default_rng(0)
        for key in [k for k in tensors if k.endswith(".shira_weight")]:
            module = key.removesuffix(".shira_weight")
            p = rng.permutation(len(tensors[key]))
            tensors[key] = tensors[key][p]
            # ascontiguousarray: fancy indexing can return Fortran order, which safetensors.numpy saves as is
            indices = tensors[module + ".shira_indices"][:, p]
            tensors[module + ".shira_indices"] = np.ascontiguousarray(indices, dtype=np.float32)

    # Same directory name: the name is recorded in the metadata
    other = copy_adapter(src, tmp_path / "b" / src.name, edit=shuffle_and_float)
    for i, d in enumerate([src, src, other]):
        code, output = pack(d, "-o", tmp_path / f"{i}.shira", "--model", "tiny-opt")
        assert code == 0, output
    blobs = {(tmp_path / f"{i}.shira").read_bytes() for i in range(3)}
    assert len(blobs) == 1


@pytest.mark.parametrize("dtype,rtol", [("fp16", 2**-11), ("bf16", 2**-8)], ids=["fp16", "bf16"])
def test_pack_half_precision(peft_adapters, tmp_path, dtype, rtol):
    adapter_dir, deltas = peft_adapters["random"]
    assert pack(adapter_dir, "-o", tmp_path / "32.shira", "--model", "tiny-opt")[0] == 0
    code, output = pack(adapter_dir, "-o", tmp_path / "16.shira", "--model", "tiny-opt", "--dtype", dtype)
    assert code == 0, output
    adapter = read_shira(tmp_path / "16.shira")
    assert adapter.dtype == dtype
    for name, target in adapter.targets.items():
        np.testing.assert_allclose(target.dense_delta(), deltas[name], rtol=rtol, atol=0)
    assert (tmp_path / "16.shira").stat().st_size < (tmp_path / "32.shira").stat().st_size


# ------------------------------------------------------------------ which base model


def test_base_model_from_the_train_sidecar(peft_adapters, tmp_path):
    src = peft_adapters["random"][0]
    for seed in (0, 5):
        d = copy_adapter(src, tmp_path / f"s{seed}")
        sidecar = {"base_model": {"name": "tiny-opt", "source": "shira_edge/configs/tiny-opt.json",
                                  "architecture": "OPTForCausalLM", "weights": "random-init", "seed": seed},
                   "method": "shira", "mask": "random", "mask_seed": 3, "tokenizer": "byte"}
        (d / "shira_edge.json").write_text(json.dumps(sidecar))
        code, output = pack(d, "-o", tmp_path / f"s{seed}.shira")
        assert code == 0, output
    pack(src, "-o", tmp_path / "m.shira", "--model", "tiny-opt")
    s0, s5, m = (read_shira(tmp_path / f"{n}.shira") for n in ("s0", "s5", "m"))
    assert s0.base_model == m.base_model  # the sidecar's seed-0 base is the tiny OPT the adapter was made on
    assert s5.base_model["fingerprint"] != m.base_model["fingerprint"] and s5.metadata["base_seed"] == 5
    assert s0.metadata["method"] == "shira" and s0.metadata["tokenizer"] == "byte"


def test_base_model_from_adapter_config(peft_adapters, tiny_opt_dir, tmp_path):
    d = copy_adapter(peft_adapters["random"][0], tmp_path / "a",
                     config_edit=lambda c: c.update(base_model_name_or_path=str(tiny_opt_dir)))
    code, output = pack(d, "-o", tmp_path / "a.shira")
    assert code == 0, output
    adapter = read_shira(tmp_path / "a.shira")
    assert adapter.metadata["base_weights"] == "pretrained"
    pack(d, "-o", tmp_path / "m.shira", "--model", "tiny-opt")
    assert adapter.base_model["fingerprint"] == read_shira(tmp_path / "m.shira").base_model["fingerprint"]


# ------------------------------------------------------------------ errors


def _set(key, fn):
    def edit(tensors):
        tensors[key] = fn(tensors[key])
    return edit


def _lora_adapter(path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    get_peft_model(make_tiny_opt(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(path)
    return path


def _first_pair_duplicated(a):
    a = a.copy()
    a[:, 1] = a[:, 0]
    return a


def _nan_first(a):
    a = a.copy()
    a[0] = np.nan
    return a


def _row_999(a):
    a = a.copy()
    a[0, 0] = 999
    return a


BROKEN = {
    "lora-adapter": (lambda src, d: _lora_adapter(d), [],
                     "adapter_config.json: peft_type is 'LORA' (a LoRA adapter?"),
    "not-an-adapter-dir": (lambda src, d: d.mkdir() or d, [], "adapter_config.json: missing; is "),
    "no-safetensors": (lambda src, d: (copy_adapter(src, d) / "adapter_model.safetensors").unlink() or d, [],
                       "adapter_model.safetensors: missing; save the adapter with save_pretrained"),
    "missing-key": (lambda src, d: copy_adapter(src, d, edit=lambda t: t.pop(FC1 + ".shira_indices")), [],
                    f"adapter_model.safetensors: key {FC1}.shira_indices is missing"),
    "count-mismatch": (lambda src, d: copy_adapter(src, d, edit=_set(FC1 + ".shira_weight", lambda a: a[:-1])),
                       [], f"key {FC1}.shira_indices: 192 index pairs but {FC1}.shira_weight has 191 values"),
    "out-of-range": (lambda src, d: copy_adapter(src, d, edit=_set(FC1 + ".shira_indices", _row_999)), [],
                     f"key {FC1}.shira_indices: row index 999 (entry 0) is out of range for the base weight's "
                     f"shape 64x32"),
    "duplicate-index": (lambda src, d: copy_adapter(src, d, edit=_set(FC1 + ".shira_indices",
                                                                      _first_pair_duplicated)), [],
                        f"key {FC1}.shira_indices: duplicate index"),
    "nan-value": (lambda src, d: copy_adapter(src, d, edit=_set(FC1 + ".shira_weight", _nan_first)), [],
                  f"key {FC1}.shira_weight: value 0 is nan"),
    "lora-key-in-shira-file": (lambda src, d: copy_adapter(src, d, edit=lambda t: t.update(
        {"base_model.model.model.decoder.layers.0.fc1.lora_A.weight": np.zeros((2, 32), np.float32)})), [],
        "key base_model.model.model.decoder.layers.0.fc1.lora_A.weight: a LoRA tensor"),
    "not-in-base-model": (lambda src, d: copy_adapter(src, d, edit=lambda t: t.update(
        {k.replace("fc1", "fc9"): t.pop(k) for k in [FC1 + ".shira_weight", FC1 + ".shira_indices"]})), [],
        "adapts model.decoder.layers.0.fc9.weight, which is not a 2-D weight of the base model 'tiny-opt'"),
    "unknown-base-model": (lambda src, d: copy_adapter(src, d), ["--no-model"],
                           "cannot tell which base model"),
    "unloadable-base-model": (lambda src, d: copy_adapter(src, d), ["--model", "facebook/opt-350m"],
                              "base model (from --model): could not load the weights of 'facebook/opt-350m'"),
    "unwritable-output": (lambda src, d: copy_adapter(src, d), ["--model", "tiny-opt", "-o", "/nonexistent/a.shira"],
                          "cannot write /nonexistent/a.shira: "),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_pack_errors_name_the_problem_and_write_nothing(peft_adapters, tmp_path, monkeypatch, case):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    make, extra, message = BROKEN[case]
    adapter_dir = make(peft_adapters["random"][0], tmp_path / "adapter")
    args = extra if extra else ["--model", "tiny-opt"]
    out = tmp_path / "out.shira"
    code, output = pack(adapter_dir, "-o", out, *[a for a in args if a != "--no-model"])
    assert code != 0
    assert message in output, output
    if case == "unknown-base-model":
        assert "--model NAME" in output and "--random-init" in output
    if case == "unloadable-base-model":
        assert "--random-init" in output
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".shira" or p.name.startswith(".out")) == []


def test_pack_library_raises_its_own_error(tmp_path):
    """pack_adapter is a library function: bad input is a PackError naming the dir, not a click exception."""
    import click

    from shira_edge.pack import PackError, pack_adapter

    with pytest.raises(PackError, match=str(tmp_path)) as info:
        pack_adapter(tmp_path, tmp_path / "a.shira", model="tiny-opt")
    assert not isinstance(info.value, click.ClickException)
    assert not (tmp_path / "a.shira").exists()


def test_interrupted_pack_leaves_no_file(peft_adapters, tmp_path, monkeypatch):
    import shira_edge.runtime.shira_format as fmt
    from shira_edge.pack import pack_adapter

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(fmt.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack_adapter(peft_adapters["random"][0], tmp_path / "a.shira", model="tiny-opt")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ inspect


def inspect(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["inspect", *map(str, args)])
    return result.exit_code, result.output


def test_inspect_reports_targets_and_bytes(peft_adapters, tmp_path):
    path = tmp_path / "a.shira"
    pack(peft_adapters["random"][0], "-o", path, "--model", "tiny-opt", "--dtype", "fp16")
    code, text = inspect(path)
    assert code == 0, text
    assert "values fp16" in text and "base model: tiny-opt  sha256:" in text
    assert re.search(r"model\.decoder\.layers\.0\.fc1\.weight\s+64x32\s+192\s+9\.38%\s+fp16\s+u8", text)
    code, raw = inspect(path, "--json")
    report = json.loads(raw)
    adapter = read_shira(path)
    assert report["total"]["nnz"] == sum(t.nnz for t in adapter.targets.values()) == sum(
        t["nnz"] for t in report["targets"])
    assert report["bytes"] == path.stat().st_size
    assert report["total"]["bytes_per_param"] == pytest.approx(path.stat().st_size / report["total"]["nnz"])
    assert f"{report['total']['bytes_per_param']:.2f} bytes per adapted parameter" in text


HOSTILE_NAME = "model.\x1b[2J\x1b[31mevil\r\nname\u202e\x07.weight"


def test_inspect_escapes_names_and_metadata_from_the_file(tmp_path):
    t = make_target(HOSTILE_NAME, (4, 4), [1, 5], [1.0, 2.0], base_digest="0" * 64)
    path = write_shira(tmp_path / "evil.shira",
                       make_adapter("base\x1b]0;pwned\x07", [t], metadata={"note\x1b[5m": "\x1b[31mred\r"}))
    code, text = inspect(path)
    assert code == 0, text
    assert not any(ch in text for ch in "\x1b\r\x07\u202e")
    assert "model.\\x1b[2J\\x1b[31mevil\\x0d\\x0aname\\u202e\\x07.weight" in text
    assert 'note\\x1b[5m: "\\u001b[31mred\\r"' in text
    assert "base\\x1b]0;pwned\\x07" in text
    code, raw = inspect(path, "--json")
    assert not any(ch in raw for ch in "\x1b\r\x07\u202e")
    assert json.loads(raw)["targets"][0]["name"] == HOSTILE_NAME  # escaped in transit, exact after parsing


def test_inspect_refuses_a_broken_file(tmp_path):
    good = encode_shira(make_adapter("m", [make_target("w", (2, 2), [0], [1.0], base_digest="0" * 64)]))
    path = tmp_path / "bad.shira"
    path.write_bytes(good[:-2])
    code, text = inspect(path)
    assert code == 1 and f"Error: {path}: target 'w' values at offset" in text and "truncated" in text


def test_inspect_does_not_import_torch(tmp_path):
    path = write_shira(tmp_path / "a.shira",
                       make_adapter("m", [make_target("w", (2, 2), [0], [1.0], base_digest="0" * 64)]))
    code = ("import sys, json\nfrom shira_edge.cli import main\n"
            f"main(['inspect', {str(path)!r}, '--json'], standalone_mode=False)\n"
            "print(json.dumps([m for m in ('torch', 'transformers', 'peft') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
