"""Files and flags from a careless or hostile user: FIFOs where files are expected, bf16/fp16 PEFT adapters, a
.shira whose shape disagrees with the model, names holding terminal escapes, and out-of-range flag values."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from shira_edge.cli import main
from shira_edge.peft_adapter import PeftAdapterError, read_safetensors
from shira_edge.runtime import AdapterMismatch, Runtime
from shira_edge.runtime.fingerprint import weight_digest
from shira_edge.runtime.shira_format import ShiraFormatError, make_adapter, make_target, read_shira, write_shira
from tests.conftest import make_tiny_opt

CONTROL = "\x1b]0;pwned\x07\x1b[2J\r\u202e"
RAW = "\x1b\x07\r\u202e"
Q0 = "model.decoder.layers.0.self_attn.q_proj.weight"


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def within(seconds: float, fn):
    """fn() in a thread; fails (instead of hanging the suite) if it blocks."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:   # noqa: BLE001 - handed back to the test
            box["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    import torch
    from peft import ShiraConfig, get_peft_model

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("peft-inputs")
    config = ShiraConfig(r=2, target_modules=["q_proj", "fc1"], init_weights=False, random_seed=3)
    get_peft_model(make_tiny_opt(seed=0), config).save_pretrained(path)
    return path


# ------------------------------------------------------------------ FIFOs are refused, never waited on


def _fifo_in_adapter(name):
    def make(tmp_path, peft_dir):
        d = shutil.copytree(peft_dir, tmp_path / "adapter")
        (d / name).unlink()
        os.mkfifo(d / name)
        return d
    return make


def _fifo(tmp_path, peft_dir):
    os.mkfifo(tmp_path / "a.shira")
    return tmp_path / "a.shira"


FIFOS = {
    "read_shira": (_fifo, lambda p, rt: read_shira(p), ShiraFormatError, "not a regular file (a FIFO)"),
    "runtime-switch": (_fifo, lambda p, rt: rt.switch(p), ShiraFormatError, "not a regular file (a FIFO)"),
    "inspect": (_fifo, lambda p, rt: cli("inspect", p), 1, "not a regular file (a FIFO)"),
    "pack-adapter-config": (_fifo_in_adapter("adapter_config.json"),
                            lambda p, rt: cli("pack", p, "-o", p.parent / "o.shira", "--model", "tiny-opt"), 1,
                            "adapter_config.json: cannot read it as JSON: "),
    "pack-safetensors": (_fifo_in_adapter("adapter_model.safetensors"),
                         lambda p, rt: cli("pack", p, "-o", p.parent / "o.shira", "--model", "tiny-opt"), 1,
                         "not a regular file (a FIFO)"),
    "export-adapter-safetensors": (_fifo_in_adapter("adapter_model.safetensors"),
                                   lambda p, rt: cli("export", "--model", "tiny-opt", "--random-init", "--adapter", p,
                                                     "-o", p.parent / "out"), 1,
                                   "adapter_model.safetensors is not a regular file"),
}


@pytest.mark.parametrize("case", list(FIFOS))
def test_a_fifo_is_refused_without_blocking(case, tmp_path, peft_dir, tiny_exports):
    make, call, expected, words = FIFOS[case]
    path = make(tmp_path, peft_dir)
    rt = Runtime(tiny_exports["onnx"], policy="instant") if case == "runtime-switch" else None
    try:
        if isinstance(expected, int):
            code, output = within(60, lambda: call(path, rt))
            assert code == expected and words in output, output
        else:
            with pytest.raises(expected, match=words.replace("(", r"\(").replace(")", r"\)")):
                within(60, lambda: call(path, rt))
    finally:
        if rt is not None:
            rt.close()


# ------------------------------------------------------------------ half-precision PEFT adapters


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_peft_adapter_packs_to_peft_values_exactly(dtype, tmp_path):
    import torch
    from peft import ShiraConfig, get_peft_model
    from peft.tuners.shira.layer import ShiraLayer

    torch.manual_seed(1)
    model = get_peft_model(make_tiny_opt(seed=0), ShiraConfig(r=2, target_modules=["q_proj", "fc1"],
                                                              init_weights=False, random_seed=3))
    model = model.to(getattr(torch, dtype))   # what bf16 training leaves behind
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {name.removeprefix("base_model.model.") + ".weight":
                    module.get_delta_weight("default").detach().to_dense().float().numpy()
                    for name, module in model.named_modules() if isinstance(module, ShiraLayer)}
    model.save_pretrained(tmp_path / "adapter")
    header_len = struct.unpack("<Q", (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()[:8])[0]
    header = json.loads((tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()[8:8 + header_len])
    stored = {v["dtype"] for k, v in header.items() if k.endswith(".shira_weight")}
    assert stored == {"BF16" if dtype == "bfloat16" else "F16"}

    code, output = cli("pack", tmp_path / "adapter", "-o", tmp_path / "a.shira", "--model", "tiny-opt")
    assert code == 0, output
    targets = read_shira(tmp_path / "a.shira").targets
    assert sorted(targets) == sorted(expected) and len(expected) == 4
    for name, target in targets.items():
        assert np.array_equal(target.dense_delta(), expected[name]), name   # bit for bit


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


SAFETENSORS = {
    "short": (b"\x01\x02", "shorter than the 8-byte header length"),
    "header-past-end": (struct.pack("<Q", 1 << 60) + b"{}", "header length 1152921504606846976 runs past"),
    "header-not-json": (struct.pack("<Q", 3) + b"{\xff}", "header is not UTF-8 JSON"),
    "bad-dtype": (_safetensors({"k": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
                  "key k: dtype 'F8_E4M3' is not one of"),
    "offsets-past-end": (_safetensors({"k": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 4),
                         "key k: data_offsets [0, 16] are not inside the 4-byte data section"),
    "shape-vs-bytes": (_safetensors({"k": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4]}}, b"\0" * 4),
                       "key k: 4 bytes do not hold a F32 tensor of shape [1099511627776]"),
    "escaped-key": (_safetensors({CONTROL: {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, b"\0" * 4),
                    "key \\x1b]0;pwned\\x07\\x1b[2J\\x0d\\u202e: shape 'x'"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS))
def test_broken_safetensors_name_the_key(case, tmp_path):
    content, words = SAFETENSORS[case]
    (tmp_path / "adapter_model.safetensors").write_bytes(content)
    with pytest.raises(PeftAdapterError) as err:
        read_safetensors(tmp_path / "adapter_model.safetensors")
    assert words in str(err.value) and not any(ch in str(err.value) for ch in RAW)


# ------------------------------------------------------------------ export --adapter with the wrong shape


def test_export_adapter_with_a_shape_the_model_lacks_fails_before_allocating(tmp_path):
    weight = make_tiny_opt(seed=0).state_dict()[Q0].numpy()
    huge = make_target(Q0, (1 << 20, 1 << 20), [0, 7], np.float32([1, 2]), base_digest=weight_digest(weight))
    adapter = write_shira(tmp_path / "huge.shira", make_adapter("m", [huge]))
    code, output = cli("export", "--model", "tiny-opt", "--random-init", "--adapter", adapter, "-o", tmp_path / "out")
    assert code == 1, output
    assert f"target {Q0} has shape 1048576x1048576 but the model's weight is 32x32" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.shira"]


# ------------------------------------------------------------------ names from files reach the terminal escaped


def _hostile_peft(tmp_path, peft_dir, lora: bool):
    from safetensors.numpy import load_file, save_file

    d = shutil.copytree(peft_dir, tmp_path / "adapter")
    tensors = load_file(str(d / "adapter_model.safetensors"))
    module = f"base_model.model.model.{CONTROL}"
    if lora:
        tensors[module + ".lora_A.weight"] = np.zeros((2, 2), np.float32)
    else:
        tensors[module + ".shira_weight"] = np.ones(2, np.float32)
        tensors[module + ".shira_indices"] = np.zeros((2, 2), np.int32)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def _hostile_shira(tmp_path):
    t = make_target(f"model.{CONTROL}.weight", (4, 4), [1], [1.0], base_digest="0" * 64)
    return write_shira(tmp_path / "evil.shira", make_adapter("m", [t]))


ESCAPES = {
    "pack-shira-key": lambda tmp, peft, rt: cli("pack", _hostile_peft(tmp, peft, False), "-o", tmp / "o.shira",
                                                "--model", "tiny-opt")[1],
    "pack-lora-key": lambda tmp, peft, rt: cli("pack", _hostile_peft(tmp, peft, True), "-o", tmp / "o.shira",
                                               "--model", "tiny-opt")[1],
    "export-adapter-target": lambda tmp, peft, rt: cli("export", "--model", "tiny-opt", "--random-init",
                                                       "--adapter", _hostile_shira(tmp), "-o", tmp / "out")[1],
    "runtime-switch-target": lambda tmp, peft, rt: _message(lambda: rt.switch(_hostile_shira(tmp))),
    "train-data-path": lambda tmp, peft, rt: cli("train", "--model", "tiny-opt", "--data", _empty(tmp), "-o",
                                                 tmp / "out")[1],
}


def _message(fn) -> str:
    with pytest.raises((AdapterMismatch, ShiraFormatError)) as err:
        fn()
    return str(err.value)


def _empty(tmp: Path) -> Path:
    path = tmp / f"notes{CONTROL}.txt"
    path.write_text("\n")
    return path


@pytest.mark.parametrize("case", list(ESCAPES))
def test_names_from_files_reach_the_terminal_escaped(case, tmp_path, peft_dir, tiny_exports):
    rt = Runtime(tiny_exports["onnx"], policy="instant") if case.startswith("runtime") else None
    try:
        text = ESCAPES[case](tmp_path, peft_dir, rt)
    finally:
        if rt is not None:
            rt.close()
    assert not any(ch in text for ch in RAW), repr(text)
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in text, text


# ------------------------------------------------------------------ flags


FLAGS = {
    "export-atol-negative": (["export", "--atol", "-1"], "--atol", "-1 is not a finite number >= 0"),
    "export-atol-nan": (["export", "--atol", "nan"], "--atol", "nan is not a finite number >= 0"),
    "export-atol-inf": (["export", "--atol", "inf"], "--atol", "inf is not a finite number >= 0"),
    "export-max-seq-len-0": (["export", "--max-seq-len", "0"], "--max-seq-len", "0 is not in the range x>=2"),
    "export-max-seq-len-1": (["export", "--max-seq-len", "1"], "--max-seq-len", "1 is not in the range x>=2"),
    "train-lr-nan": (["train", "--lr", "nan"], "--lr", "nan is not a finite number > 0"),
    "train-lr-zero": (["train", "--lr", "0"], "--lr", "0 is not a finite number > 0"),
    "train-epochs-nan": (["train", "--epochs", "nan"], "--epochs", "nan is not a finite number > 0"),
    "train-r-0": (["train", "--r", "0"], "--r", "0 is not in the range x>=1"),
    "train-steps-0": (["train", "--steps", "0"], "--steps", "0 is not in the range x>=1"),
    "train-batch-size-0": (["train", "--batch-size", "0"], "--batch-size", "0 is not in the range x>=1"),
    "train-seq-len-1": (["train", "--seq-len", "1"], "--seq-len", "1 is not in the range x>=2"),
}
REQUIRED = {"export": ["--model", "tiny-opt", "-o", "out"], "train": ["--model", "tiny-opt", "--data", "d.txt",
                                                                      "-o", "out"]}


@pytest.mark.parametrize("case", list(FLAGS))
def test_out_of_range_flags_are_usage_errors_before_anything_runs(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, flag, words = FLAGS[case]
    code, output = cli(*args, *REQUIRED[args[0]])
    assert code == 2, output   # click's usage error: raised while parsing, before the command's body
    assert f"Invalid value for '{flag}'" in output and words in output, output
    assert "[load]" not in output and list(tmp_path.iterdir()) == []
