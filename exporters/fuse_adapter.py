"""Fuse a SHiRA adapter into a base model before export, for shipping one specialised model.

    fuse_adapter(model, "adapter/")        # a PEFT adapter dir: PeftModel.from_pretrained + merge_and_unload
    fuse_adapter(model, "adapter.shira")   # a .shira file: W += dense delta, after checking each base digest

Returns (fused model, summary for manifest["export"]["adapter"]). Raises ExportError naming the file and target.
"""

from __future__ import annotations

from pathlib import Path

from .common import ExportError, tied_weights


def check_adapter_path(adapter: str | Path) -> Path:
    """Fail fast (before loading any model) on an --adapter that is neither a directory nor a file."""
    path = Path(adapter).expanduser()
    if not (path.is_dir() or path.is_file()):
        raise ExportError(f"--adapter {adapter}: no such directory or file; pass a PEFT adapter dir "
                          f"(with adapter_config.json) or a .shira file written by `shira-edge pack`")
    return path


def fuse_adapter(model, adapter: str | Path):
    path = check_adapter_path(adapter)
    return _fuse_peft(model, path) if path.is_dir() else _fuse_shira(model, path)


def _fuse_peft(model, path: Path):
    import json

    from peft import PeftModel

    config = path / "adapter_config.json"
    special = [f.name for f in path.iterdir() if f.name.startswith("adapter_") and not f.is_file()]
    if special:   # PEFT would open it, and a FIFO blocks open() forever
        raise ExportError(f"--adapter {path}: {special[0]} is not a regular file")
    if not config.is_file():
        raise ExportError(f"--adapter {path}: no adapter_config.json; is it a PEFT adapter dir?")
    try:
        peft_type = json.loads(config.read_text()).get("peft_type")
        merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ExportError(f"--adapter {path}: PEFT could not load or merge it onto this base: "
                          f"{str(exc).strip().splitlines()[0]}") from None
    return merged.eval(), {"path": str(path), "kind": "peft", "peft_type": peft_type}


def _fuse_shira(model, path: Path):
    import torch

    from ..runtime.fingerprint import weight_digest
    from ..runtime.shira_format import ShiraFormatError, read_shira

    try:
        adapter = read_shira(path)
    except ShiraFormatError as exc:
        raise ExportError(f"--adapter {path}: {exc}") from None
    params = dict(model.named_parameters())
    tied = tied_weights(model)
    with torch.no_grad():
        for name, target in adapter.targets.items():
            param = params.get(name)
            if name in tied or param is None or param.ndim != 2:
                why = f"tied to {tied[name]}" if name in tied else "not a 2-D weight of this base model"
                raise ExportError(f"--adapter {path}: target {name} is {why}; was it packed for another model?")
            if tuple(target.shape) != tuple(param.shape):   # before dense_delta allocates out*in floats
                raise ExportError(f"--adapter {path}: target {name} has shape {target.shape[0]}x{target.shape[1]} but "
                                  f"the model's weight is {param.shape[0]}x{param.shape[1]}; was it packed for "
                                  f"another model?")
            base = param.detach().numpy()
            if weight_digest(base) != target.base_digest:
                raise ExportError(f"--adapter {path}: target {name} was made for different base weights (digest "
                                  f"mismatch); export with the base model (and --seed) the adapter was trained on")
            param += torch.from_numpy(target.dense_delta()).to(param.dtype)
    summary = {"path": str(path), "kind": "shira", "name": adapter.base_model.get("name"),
               "fingerprint": adapter.base_model.get("fingerprint"), "targets": len(adapter.targets)}
    return model, summary

