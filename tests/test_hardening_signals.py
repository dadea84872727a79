"""SIGTERM, SIGINT and SIGKILL in the middle of `pack`, `export` and `train`: the output never appears half-written,
and TERM/INT leave nothing behind (no hidden temp file or dir). A SIGKILLed run leaves its temp output, which cannot
be helped; the next write to the same output removes it (runtime/orphans.py).

Each run is the real CLI in a subprocess, held at the moment its temp output exists (after the .shira temp file is
written and fsync'ed; after the export's model is loaded into its temp dir's build; after train saved the adapter
into its temp dir) by wrapping one library call; the test then sends the signal."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shira_edge.exporters.common import staged_output_dir
from shira_edge.runtime.shira_format import make_adapter, make_target, write_shira

# One process imports the CLI and its libraries once, then forks one child per run: a run starts in milliseconds
# instead of seconds of imports. Nothing has computed before the fork (no thread pools yet), so forking is safe.
# Protocol on stdin/stdout, one JSON line each: {"run": [marker, hook, cwd, args]} -> {"pid"};
# {"wait": pid} -> {"code"} (os.waitstatus_to_exitcode: -9 for SIGKILL).
ZYGOTE = textwrap.dedent("""
    import json, os, signal, sys, time
    # A shell starts background jobs (`make test &`, nohup) with SIGINT ignored and Python keeps it so: restore
    # the default here, so the test sees what a user's Ctrl-C does however pytest itself was launched.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import peft, torch, transformers
    import shira_edge.cli, shira_edge.commands.export, shira_edge.commands.pack, shira_edge.commands.train
    import shira_edge.exporters.onnx_export, shira_edge.tuner.train

    def child(marker, hook, cwd, args):
        def hold():
            open(marker, "w").close()
            time.sleep(120)

        if hook == "fsync":        # pack: the temp .shira is written, not yet renamed
            real_fsync = os.fsync
            def fsync(fd):
                real_fsync(fd)
                hold()
            os.fsync = fsync
        elif hook == "load":       # export: building in the temp dir
            import shira_edge.models as models
            real_load = models.load_model
            def load_model(*a, **k):
                loaded = real_load(*a, **k)
                hold()
                return loaded
            models.load_model = load_model
        elif hook == "save":       # train: the adapter is saved in the temp dir, not yet renamed
            real_save = peft.PeftModel.save_pretrained
            def save_pretrained(self, *a, **k):
                real_save(self, *a, **k)
                hold()
            peft.PeftModel.save_pretrained = save_pretrained
        os.chdir(cwd)
        code = 0
        try:
            shira_edge.cli.main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)

    for line in sys.stdin:
        msg = json.loads(line)
        if "run" in msg:
            pid = os.fork()
            if pid == 0:
                sys.stdin.close()
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)   # keep the protocol channel clean
                child(*msg["run"])
            print(json.dumps({"pid": pid}), flush=True)
        else:
            _, status = os.waitpid(msg["wait"], 0)
            print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
""")


class Zygote:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote process died"
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


SIGNALS = {"SIGTERM": (signal.SIGTERM, 128 + signal.SIGTERM), "SIGINT": (signal.SIGINT, 1),
           "SIGKILL": (signal.SIGKILL, -signal.SIGKILL)}


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    import torch
    from peft import ShiraConfig, get_peft_model

    from tests.conftest import make_tiny_opt

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("peft-signal")
    get_peft_model(make_tiny_opt(seed=0), ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False)) \
        .save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    rng = random.Random(0)
    words = "sparse adapters switch in place on edge boxes".split()
    path = tmp_path_factory.mktemp("signal-data") / "notes.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(25)) for _ in range(40)) + "\n")
    return path


def _command(name: str, work: Path, peft_dir: Path, notes: Path) -> tuple[str, list[str], Path]:
    out = work / ("out.shira" if name == "pack" else "out")
    if name == "pack":
        return "fsync", ["pack", str(peft_dir), "-o", str(out), "--model", "tiny-opt"], out
    if name == "export":
        return "load", ["export", "--model", "tiny-opt", "--random-init", "-o", str(out)], out
    return "save", ["train", "--model", "tiny-opt", "--data", str(notes), "--steps", "2", "--r", "2", "--seq-len",
                    "16", "--batch-size", "2", "--quiet", "-o", str(out)], out


def _hidden(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if p.name.startswith(".out"))


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.mark.parametrize("command", ["pack", "export", "train"])
def test_a_signal_mid_write_leaves_no_partial_output(command, tmp_path, peft_dir, notes, zygote):
    """One run per signal, side by side, then the same checks for each."""
    runs = {}
    try:
        for sig in SIGNALS:
            work = tmp_path / sig
            work.mkdir()
            hook, args, out = _command(command, work, peft_dir, notes)
            marker = tmp_path / f"{sig}.held"
            pid = zygote.ask(run=[str(marker), hook, str(tmp_path), args])["pid"]
            runs[sig] = (pid, marker, work, out)
        deadline = time.monotonic() + 240
        for sig, (pid, marker, work, out) in runs.items():
            while not marker.exists():
                assert time.monotonic() < deadline, f"{command} ({sig}) never reached its write"
                time.sleep(0.05)
            assert _hidden(work), f"{command} ({sig}) is held while its temp output exists"
            os.kill(pid, SIGNALS[sig][0])
        codes = {sig: zygote.ask(wait=pid)["code"] for sig, (pid, *_) in runs.items()}
    except BaseException:
        for pid, *_ in runs.values():
            _kill_quietly(pid)
        raise
    for sig, (pid, marker, work, out) in runs.items():
        assert codes[sig] == SIGNALS[sig][1], sig
        assert not out.exists(), sig
        if sig != "SIGKILL":
            assert list(work.iterdir()) == [], sig
        else:   # the next write to the same output removes what the killed run left
            leftovers = _hidden(work)
            assert leftovers and all(n.startswith(f".{out.name}.tmp-{pid}-") for n in leftovers), leftovers
            if command == "pack":
                write_shira(out, make_adapter("m", [make_target("w", (2, 2), [0], [1.0], base_digest="0" * 64)]))
            else:
                with staged_output_dir(out) as tmp:
                    (tmp / "file").write_text("x")
            assert sorted(p.name for p in work.iterdir()) == [out.name]


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_failed_final_rename_puts_the_old_out_dir_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("the previous export")
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".out.tmp-"):   # the new OUT_DIR's move into place
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        with staged_output_dir(out, force=True) as tmp:
            (tmp / "new").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "old").read_text() == "the previous export" and not (out / "new").exists()
