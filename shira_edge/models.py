"""Where base models come from: a short alias, a hub id, or a local `save_pretrained` directory.

Loading is `from_pretrained` for real (from the directory, or from the local Hugging Face cache when offline).
When the weights cannot be had, `random_init=True` builds the same architecture from a config that ships inside
this package, with seeded weights, and the returned `ModelInfo` says so; every artifact records it.

    >>> from shira_edge.models import load_model
    >>> model, info = load_model("tiny-opt")          # the built-in test model: always random-init
    >>> info.weights, info.seed
    ('random-init', 0)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

# alias -> (hub id or None, shipped config file). A None hub id means the model exists only as a config.
ALIASES: dict[str, tuple[str | None, str]] = {
    "opt-125m": ("facebook/opt-125m", "opt-125m.json"),
    "tiny-opt": (None, "tiny-opt.json"),
}
DEFAULT_SEED = 0


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _shipped_config(alias_or_id: str) -> dict[str, Any] | None:
    for alias, (hub_id, cfg_file) in ALIASES.items():
        if alias_or_id in (alias, hub_id):
            text = resources.files("shira_edge").joinpath("configs", cfg_file).read_text()
            cfg = json.loads(text)
            cfg.pop("_comment", None)
            cfg.pop("_name_or_path", None)
            return cfg
    return None


def resolve(name: str) -> tuple[str, str | None]:
    """Return (kind, target): kind is "dir", "alias" or "hub"; target is the directory or hub id (None if none)."""
    if Path(name).expanduser().is_dir():
        return "dir", str(Path(name).expanduser())
    if name in ALIASES:
        return "alias", ALIASES[name][0]
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
        try:
            model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            where = f"directory {target}" if kind == "dir" else f"the hub or the local cache ({target})"
            raise ModelNotAvailable(
                f"could not load the weights of {name!r} from {where}: {_first_line(exc)}\n"
                f"Pass --random-init to build the same architecture from its config with seeded weights "
                f"(artifacts will record weights=random-init)."
            ) from exc
        model.eval()
        info = ModelInfo(name, target, _arch(model), "pretrained", None)
        return model, info

    cfg_dict = _shipped_config(name) if kind != "dir" else None
    if cfg_dict is not None:
        model_type = cfg_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **cfg_dict)
        source = target or f"shira_edge/configs/{ALIASES[name][1]}"
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


def _arch(model) -> str:
    archs = getattr(model.config, "architectures", None)
    return archs[0] if archs else type(model).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
