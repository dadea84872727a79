"""`shira-edge train`: train -> PeftModel.from_pretrained -> pack round trip, the LoRA baseline, a 2-process
torchrun run, data reading, and bad input refused before training starts."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from shira_edge.cli import main

SIDECAR_KEYS = {"base_model", "method", "mask", "mask_seed", "r", "target_modules", "tokenizer", "steps", "eval_loss"}
COMMON = ["--model", "tiny-opt", "--seq-len", "32", "--batch-size", "4", "--lr", "0.01", "--quiet", "--r", "4"]


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = "sparse high rank adapters switch in place on phones and edge boxes without fusing".split()
    path = tmp_path_factory.mktemp("data") / "notes.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(25)) for _ in range(40)) + "\n")
    return path


def train_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["train", *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def snip_adapter(notes, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("train") / "adapter"
    code, output = train_cli(*COMMON, "--data", str(notes), "--mask", "snip", "--steps", "6", "-o", str(out))
    assert code == 0, output
    return out, output


def held_out_blocks(notes: Path):
    from shira_edge.data import load_blocks, load_tokenizer

    return load_blocks(notes, load_tokenizer(None, 512), seq_len=32, seed=0)[1]


def test_train_writes_a_peft_adapter_and_the_sidecar(snip_adapter):
    out, output = snip_adapter
    assert {"adapter_config.json", "adapter_model.safetensors", "shira_edge.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["mask_type"], config["random_seed"], config["r"]) == ("SHIRA", "snip", 0, 4)
    sidecar = json.loads((out / "shira_edge.json").read_text())
    assert set(sidecar) == SIDECAR_KEYS
    assert sidecar["base_model"] == {"name": "tiny-opt", "source": "shira_edge/configs/tiny-opt.json",
                                     "architecture": "OPTForCausalLM", "weights": "random-init", "seed": 0,
                                     "provenance": None}
    assert (sidecar["method"], sidecar["mask"], sidecar["mask_seed"], sidecar["r"], sidecar["steps"]) == \
        ("shira", "snip", 0, 4, 6)
    assert sidecar["target_modules"] == ["q_proj", "v_proj"] and sidecar["tokenizer"] == "byte-level"
    line = output.strip().splitlines()[-1]
    assert line.startswith(f"eval loss {sidecar['eval_loss']:.4f}") and "trainable 1,024 params" in line
    assert "density 25.00%" in line and "peak memory" in line and "MiB (RSS)" in line


def test_peft_loads_the_adapter_and_reproduces_its_eval_loss(snip_adapter, notes):
    from peft import PeftModel

    from shira_edge.models import load_model
    from shira_edge.tuner.train import evaluate_loss

    out, _ = snip_adapter
    sidecar = json.loads((out / "shira_edge.json").read_text())
    blocks = held_out_blocks(notes)
    base_loss = evaluate_loss(load_model("tiny-opt")[0], blocks)
    loaded = PeftModel.from_pretrained(load_model("tiny-opt")[0], out)
    assert evaluate_loss(loaded, blocks) == pytest.approx(sidecar["eval_loss"], abs=1e-5)
    assert sidecar["eval_loss"] < base_loss - 1e-3  # the adapter learned something


def test_train_then_pack_round_trip(snip_adapter, tmp_path):
    from peft import PeftModel

    from shira_edge.pack import pack_adapter
    from shira_edge.models import load_model
    from shira_edge.runtime.shira_format import read_shira

    out, _ = snip_adapter
    summary = pack_adapter(out, tmp_path / "a.shira")
    assert summary["nnz"] == 1024 and summary["weights"] == "random-init"
    packed = read_shira(tmp_path / "a.shira")
    assert packed.metadata["mask"] == "snip" and packed.metadata["tokenizer"] == "byte-level"
    base = load_model("tiny-opt")[0].state_dict()
    merged = PeftModel.from_pretrained(load_model("tiny-opt")[0], out).merge_and_unload().state_dict()
    assert len(packed.targets) == 4
    for name, target in packed.targets.items():
        patched = base[name].numpy() + target.dense_delta()
        assert not torch.equal(merged[name], base[name])
        torch.testing.assert_close(torch.from_numpy(patched), merged[name], rtol=0, atol=1e-7)


def test_lora_baseline_has_the_same_trainable_parameters(notes, tmp_path):
    from peft import PeftModel

    from shira_edge.models import load_model
    from shira_edge.tuner.train import train_adapter

    kw = dict(r=4, seq_len=32, batch_size=4, steps=2, progress=False)
    lora = train_adapter("tiny-opt", notes, tmp_path / "lora", method="lora", **kw)
    shira = train_adapter("tiny-opt", notes, None, method="shira", mask="wm", **kw)
    assert lora.trainable == shira.trainable == 1024 and shira.out_dir is None
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    sidecar = json.loads((tmp_path / "lora" / "shira_edge.json").read_text())
    assert (sidecar["method"], sidecar["mask"]) == ("lora", None)
    PeftModel.from_pretrained(load_model("tiny-opt")[0], tmp_path / "lora")


def test_two_process_torchrun_equals_one_process_with_the_whole_batch(notes, tmp_path):
    """DDP averages the ranks' gradients and each rank trains on its half of the global batch, so 2 x batch 2
    must follow the same path as 1 x batch 4."""
    from shira_edge.tuner.train import train_adapter

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "shira_edge.cli", "train", *COMMON[:-2], "-r", "4", "--batch-size", "2", "--data", str(notes), "--steps", "4",
           "-o", str(tmp_path / "ddp")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("eval loss") == 1 and "max over 2 ranks" in run.stdout  # only rank 0 reports

    single = train_adapter("tiny-opt", notes, tmp_path / "one", r=4, seq_len=32, batch_size=4, lr=0.01, steps=4,
                           progress=False)
    ddp_values, one_values = load_file(tmp_path / "ddp" / "adapter_model.safetensors"), load_file(
        tmp_path / "one" / "adapter_model.safetensors")
    assert ddp_values.keys() == one_values.keys()
    for key in ddp_values:
        torch.testing.assert_close(ddp_values[key], one_values[key], rtol=1e-4, atol=1e-5)
    ddp_loss = json.loads((tmp_path / "ddp" / "shira_edge.json").read_text())["eval_loss"]
    assert ddp_loss == pytest.approx(single.eval_loss, abs=1e-4)


def test_jsonl_data_and_its_errors(tmp_path):
    from shira_edge.data import ByteTokenizer, DataError, read_texts

    good = tmp_path / "d.jsonl"
    good.write_text('{"text": "caf\\u00e9"}\n\n{"text": "b", "id": 2}\n')
    assert read_texts(good) == ["café", "b"]
    assert ByteTokenizer().encode("é") == [2, 0xC3 + 4, 0xA9 + 4, 2]
    assert ByteTokenizer().decode(ByteTokenizer().encode("café")) == "café"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected an object with a string 'text' field"):
        read_texts(bad)


def _write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


BAD_INPUTS = {
    "missing-data": (lambda t, n: ["--data", str(t / "nope.txt")], ["--data", "nope.txt", "does not exist"]),
    "empty-data": (lambda t, n: ["--data", _write(t, "empty.txt", "\n  \n")], ["--data", "empty.txt", "is empty"]),
    "unknown-mask": (lambda t, n: ["--data", str(n), "--mask", "magic"], ["--mask", "magic"]),
    "unknown-module": (lambda t, n: ["--data", str(n), "--target-modules", "q_proj,qkv"],
                       ["--target-modules", "'qkv'", "q_proj, v_proj"]),
    "r-too-large": (lambda t, n: ["--data", str(n), "--r", "17"],
                    ["--r", "q_proj (32x32)", "r(m+n) = 1088 exceeds m*n = 1024", "use --r 16 or less"]),
    "steps-and-epochs": (lambda t, n: ["--data", str(n), "--steps", "2", "--epochs", "1"], ["--steps", "not both"]),
    "too-little-data": (lambda t, n: ["--data", _write(t, "short.txt", "tiny\n")], ["--data", "short.txt", "block"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_before_training_naming_the_flag(case, notes, tmp_path):
    make_args, expected = BAD_INPUTS[case]
    args = COMMON[:-2] if case == "r-too-large" else COMMON
    code, output = train_cli(*args, *make_args(tmp_path, notes), "-o", str(tmp_path / "out"))
    assert code != 0
    for text in expected:
        assert text in output, (text, output)
    assert "train shira" not in output and not (tmp_path / "out").exists()


def test_tokenizer_is_the_models_own_when_its_dir_has_one(tiny_opt_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from shira_edge.data import load_tokenizer

    assert load_tokenizer(str(tiny_opt_dir), 512).name == "byte-level"  # a model dir without tokenizer files
    vocab = {"<pad>": 1, "</s>": 2, "<unk>": 3, "sparse": 4, "adapters": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path), 512)
    assert tokenizer.name == f"hf:{tmp_path}"
    assert tokenizer.encode("sparse adapters rock")[-4:] == [4, 5, 3, 2]
