"""The tokenizer an export carries, so the device gets text in and text out (runtime/tokenizer.py reads it).

`export_tokenizer` writes, from the model's own transformers tokenizer (`save_pretrained`):

- tokenizer.json (as transformers saved it: everything the `tokenizers` library needs to encode and decode);
- tokenizer_config.json, cut down to the keys that say which tokens are special and how decoding cleans up;
- chat_template.jinja, when the model has a chat template;

and returns the manifest `files` entries naming them. It then reads them back through the runtime's TextTokenizer
and checks encode, decode and the chat template against transformers on probe texts: a tokenizer whose behaviour
lives in Python code rather than in tokenizer.json would tokenize differently on the device, so it is refused.

    >>> export_tokenizer("path/to/hf-model-dir", out_dir, vocab_size=49152)    # doctest: +SKIP
    {'tokenizer': 'tokenizer.json', 'tokenizer_config': 'tokenizer_config.json', 'chat_template': 'chat_template.jinja'}
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from shira_edge.exporters.common import ExportError

FILES = {"tokenizer": "tokenizer.json", "tokenizer_config": "tokenizer_config.json",
         "chat_template": "chat_template.jinja"}
# Files that hold a vocabulary: a directory without any of them has no tokenizer (a tokenizer_config.json alone is
# not one, though transformers 5 would build an empty tokenizer from it).
VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "sentencepiece.bpe.model", "spm.model")
CONFIG_KEYS = ("tokenizer_class", "backend", "bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
               "cls_token", "mask_token", "extra_special_tokens", "clean_up_tokenization_spaces", "model_max_length",
               "add_bos_token", "add_eos_token", "padding_side")
PROBE_TEXTS = ("Hello world! The capital of France is Paris.", "  two  spaces, a\ttab\nand a new line",
               "numbers 12345 and 3.14; unicode: héllo, 日本語, 🙂", "")
PROBE_CHATS = ([{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}])


def export_tokenizer(source, out_dir, vocab_size: int | None = None) -> dict:
    """Write the tokenizer of `source` (a transformers tokenizer, a model directory, a .gguf file or a hub id found
    in the local cache) into out_dir; return the manifest `files` entries, all None when there is no tokenizer."""
    tokenizer = load_source_tokenizer(source)
    if tokenizer is None:
        return dict.fromkeys(FILES)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        saved = Path(tmp)
        if not (saved / FILES["tokenizer"]).is_file():
            raise ExportError(f"the tokenizer of {source} ({type(tokenizer).__name__}) saves no tokenizer.json; the "
                              f"runtime reads only tokenizer.json (a fast tokenizer), so this model cannot carry text")
        shutil.copyfile(saved / FILES["tokenizer"], out_dir / FILES["tokenizer"])
        config_file = saved / FILES["tokenizer_config"]
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config = {k: v for k, v in config.items() if k in CONFIG_KEYS}   # not the loader's own kwargs (paths, flags)
    (out_dir / FILES["tokenizer_config"]).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    files = dict(FILES)
    template = tokenizer.chat_template
    if isinstance(template, dict):   # named templates: the device renders the default one
        template = template.get("default")
    if template:
        (out_dir / FILES["chat_template"]).write_text(template)
    else:
        files["chat_template"] = None
    check_tokenizer(tokenizer, out_dir, files, vocab_size, source)
    return files


def load_source_tokenizer(source):
    """The transformers tokenizer of `source`, or None when it has none (a config-only or random-init model)."""
    if source is None or hasattr(source, "save_pretrained"):
        return source
    from transformers import AutoTokenizer

    path = Path(str(source)).expanduser()
    try:
        if path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if path.is_dir():
            if not any((path / f).is_file() for f in VOCAB_FILES):
                return None
            return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; all mean the same to the user
        raise ExportError(f"{source}: has tokenizer files but transformers cannot load them ({exc}); fix or remove "
                          f"them") from None
    parts = str(source).split("/")
    if len(parts) != 2 or not all(parts):   # not a hub id (e.g. a shipped config's path): no tokenizer
        return None
    try:   # a hub id: only what the local cache already holds (offline)
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache is normal for --random-init offline
        return None


def check_tokenizer(tokenizer, out_dir: Path, files: dict, vocab_size, source) -> None:
    """Read the written files back through the runtime and refuse the export where it differs from transformers."""
    from shira_edge.runtime.tokenizer import TextTokenizer, TokenizerError

    try:
        device = TextTokenizer.from_export(out_dir, {"files": files, "io": {"vocab_size": vocab_size}})
    except TokenizerError as exc:
        raise ExportError(f"the tokenizer of {source} cannot be carried: {exc}") from None
    special = [t for t in device.special_tokens.values()]
    for text in (*PROBE_TEXTS, " ".join(special) + " after the special tokens"):
        ids = list(tokenizer(text)["input_ids"])
        _same(device.encode(text), ids, f"encode({text!r})", source)
        for skip in (False, True):
            _same(device.decode(ids, skip_special_tokens=skip), tokenizer.decode(ids, skip_special_tokens=skip),
                  f"decode({ids}, skip_special_tokens={skip})", source)
    if files["chat_template"] is None:
        return
    for chat in PROBE_CHATS:
        try:
            expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - templates may refuse e.g. a system role; nothing to compare then
            continue
        _same(device.apply_chat_template(chat, add_generation_prompt=True), expected,
              f"the chat template on {chat}", source)


def _same(device, host, what: str, source) -> None:
    if device != host:
        raise ExportError(f"the tokenizer of {source} cannot be carried: {what} gives {device!r} through "
                          f"tokenizer.json but {host!r} through transformers (Python-side tokenizer logic the "
                          f"device would not run)")
