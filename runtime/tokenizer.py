"""Text in, text out on the device: the tokenizer an export carries, read with the `tokenizers` library (no torch,
no transformers), and its chat template rendered the way transformers renders it (jinja2, sandboxed).

An export names its tokenizer files in manifest.json `files` (written by exporters/tokenizer_files.py):

    "tokenizer": "tokenizer.json"              # the tokenizers library's own file: vocabulary, merges, special tokens
    "tokenizer_config": "tokenizer_config.json"   # bos/eos/unk/pad token strings, clean_up_tokenization_spaces
    "chat_template": "chat_template.jinja"     # or null: the model has no chat template

Every file is untrusted input: a missing, oversized or malformed one raises TokenizerError naming it.

    >>> tok = TextTokenizer.from_export("out/", read_manifest("out/"))     # doctest: +SKIP
    >>> tok.decode(tok.encode("Hello world"), skip_special_tokens=True)    # doctest: +SKIP
    'Hello world'
    >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])       # doctest: +SKIP
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .manifest import confined
from .untrusted import printable, read_regular

MAX_TOKENIZER_BYTES = 256 << 20   # Gemma's tokenizer.json, the largest common one, is ~33 MB
MAX_TEXT_BYTES = 1 << 20          # tokenizer_config.json and the chat template are a few kB
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REEXPORT = "re-export the model with this shira-edge"


class TokenizerError(ValueError):
    """A tokenizer file of an export is missing or malformed, or an export has none; the message names the file."""


class TextTokenizer:
    """encode / decode through tokenizer.json and `apply_chat_template`, as transformers' fast tokenizer does them."""

    def __init__(self, tokenizer_file, config_file=None, chat_template_file=None, vocab_size: int | None = None):
        from tokenizers import Tokenizer

        self.path = Path(tokenizer_file)
        where = printable(self.path)
        text = _read_text(self.path, MAX_TOKENIZER_BYTES)
        try:
            self._tok = Tokenizer.from_str(text)
            model_type = json.loads(text)["model"]["type"]
        except Exception as exc:  # noqa: BLE001 - the Rust parser raises plain Exception
            raise TokenizerError(f"{where}: not a tokenizer.json the tokenizers library can read "
                                 f"({printable(_first_line(exc))}); {REEXPORT}") from None
        highest = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)
        if vocab_size is not None and highest >= vocab_size:
            raise TokenizerError(f"{where}: has token id {highest}, but the model's vocabulary is {vocab_size}: "
                                 f"the tokenizer belongs to another model; {REEXPORT}")
        config = _read_config(Path(config_file)) if config_file else {}
        self.special_tokens = {}   # name -> string, as transformers' special_tokens_map (what templates see)
        for name in SPECIAL_TOKENS:
            token = _token_string(config.get(name), f"{printable(config_file)}: {name}")
            if token is not None:
                if self._tok.token_to_id(token) is None:
                    raise TokenizerError(f"{printable(config_file)}: {name} {token!r} is not a token of "
                                         f"{printable(self.path.name)}; {REEXPORT}")
                self.special_tokens[name] = token
        # transformers skips this clean-up for BPE models, where it would eat real spaces before punctuation
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and model_type != "BPE"
        self.chat_template = None
        if chat_template_file:
            self.chat_template_path = Path(chat_template_file)
            self.chat_template = _read_text(self.chat_template_path, MAX_TEXT_BYTES)
            self._template = _compile_template(self.chat_template, self.chat_template_path)

    @classmethod
    def from_export(cls, export_dir, manifest: dict) -> TextTokenizer | None:
        """The tokenizer named by manifest `files`, or None when the export carries none."""
        files = manifest.get("files") or {}
        if not files.get("tokenizer"):
            return None
        paths = {key: _export_file(export_dir, files, key)
                 for key in ("tokenizer", "tokenizer_config", "chat_template")}
        vocab = manifest.get("io", {}).get("vocab_size")
        return cls(paths["tokenizer"], paths["tokenizer_config"], paths["chat_template"],
                   vocab if isinstance(vocab, int) else None)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special_tokens.get("eos_token")
        return None if eos is None else self._tok.token_to_id(eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the tokenizer's own special tokens (e.g. BOS) unless add_special_tokens=False."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **variables) -> str:
        """The chat as the model was trained to see it: the template rendered with `messages`,
        `add_generation_prompt`, the special tokens (bos_token, eos_token, ...) and `variables`, exactly as
        transformers' `apply_chat_template(..., tokenize=False)` renders it. Encode the result with
        add_special_tokens=False: the template writes its own BOS."""
        if self.chat_template is None:
            raise TokenizerError(f"{printable(self.path.parent)} carries no chat template (manifest.json "
                                 f"files.chat_template is null); pass plain text, or export a model that has one")
        if isinstance(messages, dict) or not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        chat = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"messages[{i}] is a {type(message).__name__}, not a dict with role and content")
            # as transformers: keys whose value is None are dropped (templates handle a missing key, not None)
            chat.append({k: _plain(v, f"messages[{i}][{k!r}]") for k, v in message.items() if v is not None})
        context = {**self.special_tokens, **{k: _plain(v, k) for k, v in variables.items()}}
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **context)
        except TemplateError as exc:   # e.g. raise_exception("roles must alternate user/assistant")
            raise ValueError(f"the chat template ({printable(self.chat_template_path)}) refused these messages: "
                             f"{printable(exc)}") from None


# ---------------------------------------------------------------------- files


def _export_file(export_dir, files: dict, key: str) -> Path | None:
    """manifest `files[key]` as a path inside the export dir (manifest.confined refuses one that leaves it)."""
    name = files.get(key)
    if name is None:
        return None
    if not isinstance(name, str):
        raise TokenizerError(f"{printable(Path(export_dir) / 'manifest.json')}: files.{key}: not a file name; "
                             f"{REEXPORT}")
    return confined(Path(export_dir), name, f"files.{key}", str(Path(export_dir) / "manifest.json"))


def _read_text(path: Path, limit: int) -> str:
    try:
        return read_regular(path, "tokenizer file", limit).decode("utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{printable(path)}: not found, though manifest.json names it; {REEXPORT}") from None
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{printable(path)}: not UTF-8 text (byte {exc.start}); {REEXPORT}") from None
    except (OSError, ValueError) as exc:   # not a regular file, over the limit, unreadable
        raise TokenizerError(f"{printable(path)}: cannot be read ({printable(exc)}); {REEXPORT}") from None


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(_read_text(path, MAX_TEXT_BYTES))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{printable(path)}: not valid JSON ({printable(exc)}); {REEXPORT}") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{printable(path)}: should hold a JSON object; {REEXPORT}")
    return config


def _token_string(value, where: str) -> str | None:
    """A special token as transformers writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{where} should be a token string, got {type(value).__name__}; {REEXPORT}")
    return value


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _clean_up_tokenization(text: str) -> str:
    # transformers' PreTrainedTokenizerBase.clean_up_tokenization, for WordPiece-era configs that ask for it
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


# ---------------------------------------------------------------------- chat template


def _plain(value, where: str):
    """Only JSON data reaches the sandboxed template: objects with methods could be a way out of it."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise ValueError(f"{where}: a {type(value).__name__}; chat messages hold JSON data only (str, numbers, lists, "
                     f"dicts)")


def _compile_template(source: str, path: Path):
    """The template compiled in the environment transformers uses (chat_template_utils._compile_jinja_template):
    an immutable sandbox, trim_blocks/lstrip_blocks, loop controls, `{% generation %}` blocks, and the same
    globals and tojson. A template is code from the model's author: the sandbox is what keeps it in its place."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        # transformers marks assistant text for training masks with {% generation %}; rendering is unchanged
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # as transformers: no underscore attributes, so a template cannot reach interpreter internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=Dict(), namespace=Namespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        raise TokenizerError(f"{printable(path)}: not a valid jinja2 chat template ({printable(exc)}); "
                             f"{REEXPORT}") from None
