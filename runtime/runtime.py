"""`Runtime`: one exported model, SHiRA adapters switched in place, runs, generation and text in, text out.

The switch path, top to bottom:

1. `prepare(source)` reads the `.shira`, validates it against manifest.json and maps its indices into the backend's
   flat weight buffer (patch.prepare_adapter). Cached per content (patch.adapter_key: SHA-256 of the bytes).
2. `plan(...)` composes the adapters at their scales into final float32 values plus the base values to restore
   (patch.compose). Cached per combination.
3. `switch(...)` does 1 and 2 first, so nothing is touched until the new state is known to be valid; then, under
   the write lock, it scatters the live plan's base values back and the new plan's values in (scatter.scatter_into),
   and tells the backend (runtime/backend.py). ONNX Runtime's packed-in-place path needs nothing more: the scatter
   wrote into the packed weights its session computes from. If the backend fails to take the new weights (a failed
   rebuild on the fallback path), the old values are written back and nothing has changed.

Runs and generations hold the read lock, so they see either the old state or the new one, never a mix.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path
from types import MappingProxyType

import numpy as np

from .fingerprint import base_fingerprint
from .layout import buffer_positions
from .patch import (BASE_PLAN, Plan, PreparedAdapter, Slot, adapter_key, compose, file_view, pin_base,
                    prepare_adapter)
from .rwlock import RWLock
from .sampling import TokenPicker
from .scatter import check_plan, kernel as scatter_kernel, scatter_into
from .tokenizer import TextTokenizer, TokenizerError

PLAN_CACHE = 16      # composed states kept; each costs 16 bytes per touched weight


class Runtime:
    """Load an export directory (manifest.json decides the backend) and switch SHiRA adapters in place.

    ONNX Runtime writes a switch straight into the packed weights of its one session (`switch_path` ==
    "packed-in-place": live and at full speed when switch() returns) once its start-up self-test passes. policy only
    matters where it does not (`switch_path` == "rebuild", with a warning saying why; or in_place=False): "auto"
    (default; live in milliseconds, full speed after a background rebuild, see `wait_ready`), "instant" (never
    rebuild: unpacked speed always) or "packed" (a switch returns after the rebuild). ExecuTorch accepts only
    "auto"/"packed" (the same thing there).
    threads: intra-op threads of the backend (None: its default). scatter_threads: threads of the switch kernel.
    """

    def __init__(self, export_dir, threads: int | None = None, *, policy: str = "auto",
                 scatter_threads: int | None = None, in_place: bool = True):
        from .manifest import read_manifest

        self.dir = Path(export_dir)
        self.manifest = read_manifest(self.dir)
        if self.manifest["backend"] == "onnxruntime":
            from .onnx_backend import OnnxBackend as backend_class
        else:
            from .executorch_backend import ExecuTorchBackend as backend_class
        self._backend = backend_class(self.dir, self.manifest, policy=policy, threads=threads, in_place=in_place)
        self.policy = policy
        self._vocab = self.manifest["io"].get("vocab_size")   # validated by read_manifest
        pin_base(file_view(s) for s in self._backend.slots.values())   # base values as loaded (patch.read_base)
        self.scatter_threads = scatter_threads or threads or 1
        self.scatter_kernel = scatter_kernel()   # "native" | "numpy"; builds the native one now, not in a switch
        self._lock = RWLock()
        self._adapters: dict[str, PreparedAdapter] = {}
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._live = BASE_PLAN
        self.last_switch: dict[str, float] = {}

    # ------------------------------------------------------------------ adapters

    def _fingerprint_of(self, names) -> str:
        slots = self._backend.slots   # one Slot per manifest weight, digest included
        return base_fingerprint({n: ((slots[n].out, slots[n].inp), slots[n].digest) for n in names if n in slots})

    def prepare(self, source) -> PreparedAdapter:
        """Read, validate and map one adapter (str, Path or bytes), or return the cached result."""
        if isinstance(source, PreparedAdapter):
            return source
        key = adapter_key(source)
        with self._cache_lock:
            hit = self._adapters.get(key)
        if hit is None:
            hit = prepare_adapter(source, self._backend.slots, self._fingerprint_of)
            with self._cache_lock:   # under the key of the bytes it was made from (the file may have changed since)
                self._adapters[hit.key] = hit
        return hit

    def plan(self, adapters, scales=None) -> Plan:
        """The state `switch(adapters, scales)` would make live, composed and cached (nothing is touched)."""
        if adapters is None:
            return BASE_PLAN
        if isinstance(adapters, (str, Path, bytes, bytearray, memoryview, PreparedAdapter)):
            adapters = [adapters]
        adapters = list(adapters)
        scales = [1.0] * len(adapters) if scales is None else [float(s) for s in np.atleast_1d(scales)]
        if len(scales) != len(adapters):
            raise ValueError(f"scales: {len(scales)} values for {len(adapters)} adapters; give one per adapter")
        prepared = [self.prepare(a) for a in adapters]
        if len({p.key for p in prepared}) != len(prepared):
            raise ValueError("the same adapter is given twice; give it once with the sum of its scales")
        key = tuple((p.key, s) for p, s in zip(prepared, scales))
        with self._cache_lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = compose(list(zip(prepared, scales)))
        check_plan(self._backend.flat, plan.positions, plan.values)
        with self._cache_lock:
            self._plans[key] = plan
            while len(self._plans) > PLAN_CACHE:   # the live plan stays reachable through self._live
                self._plans.popitem(last=False)
        return plan

    def forget(self, source) -> None:
        """Drop one adapter (str, Path or bytes) and every cached state that uses it from the caches, e.g. for an
        app that streams through many adapters. The live state stays live; switching back prepares it again."""
        key = source.key if isinstance(source, PreparedAdapter) else adapter_key(source)
        with self._cache_lock:
            self._adapters.pop(key, None)
            for plan_key in [k for k in self._plans if any(part[0] == key for part in k)]:
                del self._plans[plan_key]

    def switch(self, adapters, scales=None) -> None:
        """Make `adapters` (one, a list fused at `scales`, or None for the base model) live.

        Everything that can fail happens before the first write; a failure leaves the live weights as they were.
        Returns when runs see the new weights (at full speed only once `ready`; see `wait_ready`).
        """
        start = time.perf_counter()
        new = self.plan(adapters, scales)
        prepared = time.perf_counter()
        with self._lock.writing():
            locked = scatter_start = scattered = time.perf_counter()
            if new is not self._live:
                old, flat, threads = self._live, self._backend.flat, self.scatter_threads
                self._backend.weights_changed()
                scatter_start = time.perf_counter()
                scatter_into(flat, old.positions, old.base, threads)
                scatter_into(flat, new.positions, new.values, threads)
                scattered = time.perf_counter()
                try:
                    self._backend.after_scatter()
                except BaseException:   # e.g. a failed rebuild: put the old state back, then re-raise
                    scatter_into(flat, new.positions, new.base, threads)
                    scatter_into(flat, old.positions, old.values, threads)
                    self._backend.weights_reverted()
                    raise
                self._live = new
            done = time.perf_counter()
        self.last_switch = {"prepare_s": prepared - start, "wait_s": locked - prepared,
                            "scatter_s": scattered - scatter_start,
                            "reload_s": (scatter_start - locked) + (done - scattered), "total_s": done - start}

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """What is live: ((adapter name, scale), ...); () for the base model."""
        return self._live.active

    @property
    def switch_path(self) -> str:
        """How a switch reaches the kernels: "packed-in-place" (ONNX Runtime, live at full speed when switch()
        returns), "rebuild" (ONNX Runtime fallback; see `switch_fallback_reason`) or the backend's own path."""
        return getattr(self._backend, "switch_path", "reload")

    @property
    def switch_fallback_reason(self) -> str | None:
        """Why the packed-in-place path is not used (None where it is, or where the backend has no such path)."""
        return getattr(self._backend, "fallback_reason", None)

    @property
    def ready(self) -> bool:
        """True when runs go at full speed for the live weights (always, except right after an "auto" switch)."""
        return self._backend.ready

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until runs go at full speed; False if `timeout` seconds passed first."""
        return self._backend.wait_ready(timeout)

    @property
    def backend_name(self) -> str:
        """"onnxruntime" or "executorch": the backend this export runs on."""
        return self._backend.backend

    @property
    def start_timings(self) -> dict[str, float]:
        """Seconds per start-up step of the backend's switch path ({} where the backend records none)."""
        return dict(getattr(self._backend, "start_timings", {}))

    @property
    def slots(self) -> "MappingProxyType[str, Slot]":
        """name -> Slot: where each manifest weight lives in `weight_buffer` (runtime/layout.py maps it)."""
        return MappingProxyType(self._backend.slots)

    @property
    def weight_buffer(self) -> np.ndarray:
        """A read-only view of the one float32 buffer every patchable weight lives in (live values). For checks
        and benchmarks: compare snapshots of it, or time kernels on a copy; weights change only through switch()."""
        view = self._backend.flat.view()
        view.flags.writeable = False
        return view

    # ------------------------------------------------------------------ running

    def run(self, input_ids) -> np.ndarray:
        """Logits [batch, seq, vocab] of a full forward over `input_ids` [batch, seq] (or [seq])."""
        ids = _ids(input_ids, self._vocab)
        with self._lock.reading():
            return self._backend.forward(ids)

    def step(self, input_ids, cache=None):
        """One KV-cache step: (logits [batch, seq, vocab], cache). Pass the returned cache to the next step."""
        with self._lock.reading():
            return self._backend.step(_ids(input_ids, self._vocab), cache)

    def generate(self, input_ids, max_new_tokens: int = 32, eos_token_id="auto", *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> np.ndarray:
        """Decoding with the KV cache: [batch, prompt + new] token ids (the prompt included, as in HF).

        Greedy by default; temperature > 0 samples (after a top_p cut), repeatably for a given seed. It stops once
        every row has produced an EOS token: eos_token_id "auto" means the export's (manifest io.eos_token_id, one
        id or a list), an int or a list gives others, None never stops early. A row that finished is padded with
        io.pad_token_id (else its EOS), as transformers does. The whole generation runs under one read lock, so all
        its tokens come from one adapter state; a switch waits for it. A prompt that does not fit the export's
        positions together with max_new_tokens is refused before anything runs.
        """
        ids = _ids(input_ids, self._vocab)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        pick = TokenPicker(temperature, top_p, seed)
        eos = self._eos_ids(eos_token_id)
        self._check_fits(ids.shape[1], int(max_new_tokens))
        pad = self.manifest["io"].get("pad_token_id")
        pad = pad if isinstance(pad, int) else (eos[0] if eos else 0)
        with self._lock.reading(), self._backend.sequence_lock:
            if self._backend.batch_limit == 1 and ids.shape[0] > 1:   # one cache slot: one row at a time
                rows = [self._decode(row[None], max_new_tokens, eos, pad, pick) for row in ids]
                width = max(r.shape[1] for r in rows)
                return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=pad)
                                       for r in rows])
            return self._decode(ids, max_new_tokens, eos, pad, pick)

    def _decode(self, ids, max_new_tokens, eos, pad, pick) -> np.ndarray:
        out = [ids]
        finished = np.zeros(ids.shape[0], bool)
        logits, cache = self._backend.step(ids, None)
        for i in range(max_new_tokens):
            nxt = np.where(finished, pad, pick(logits[:, -1]))
            out.append(nxt[:, None])
            finished |= np.isin(nxt, eos)
            if finished.all():
                break
            if i + 1 < max_new_tokens:
                logits, cache = self._backend.step(nxt[:, None], cache)
        return np.concatenate(out, axis=1)

    def _eos_ids(self, eos_token_id) -> list[int]:
        if isinstance(eos_token_id, str) and eos_token_id == "auto":
            eos_token_id = self.manifest["io"].get("eos_token_id")
        if eos_token_id is None:
            return []
        ids = [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"eos_token_id must be 'auto', None, a token id or a list of them, got {eos_token_id!r}")
        return [int(i) for i in ids]

    def _check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse, before running anything, a generation that would run past the positions the export has."""
        io = self.manifest["io"]
        limit = io.get("cache", {}).get("max_seq_len") or io.get("max_positions")
        if not isinstance(limit, int):
            return
        if self._backend.backend == "executorch":
            what, fix = f"this ExecuTorch export's static KV cache of {limit} positions", "a larger --max-seq-len"
        else:
            what, fix = (f"the {limit} positions this ONNX export was made for (the model's max positions, or "
                         f"--max-seq-len at export)"), "a larger --max-seq-len if the model allows"
        run = prompt_len + max(max_new_tokens - 1, 0)   # the last new token is never run
        if prompt_len > limit:
            raise ValueError(f"the prompt has {prompt_len} tokens, more than {what}; shorten it, or re-export with "
                             f"{fix}")
        if run > limit:
            raise ValueError(f"a prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} runs {run} "
                             f"positions, more than {what}; lower max_new_tokens to {limit - prompt_len + 1} or "
                             f"re-export with {fix}")

    # ------------------------------------------------------------------ text

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer the export carries (encode, decode, apply_chat_template); loaded and checked once."""
        tok = self.__dict__.get("_tokenizer")
        if tok is None:
            tok = TextTokenizer.from_export(self.dir, self.manifest)
            if tok is None:
                raise TokenizerError(f"{self.dir} carries no tokenizer (manifest.json files.tokenizer is null): "
                                     f"re-export with `shira-edge export` from a model directory or hub id whose "
                                     f"tokenizer is available locally, or pass token ids to generate()")
            self._tokenizer = tok
        return tok

    def generate_text(self, prompt, max_new_tokens: int = 64, *, chat: bool | None = None,
                      temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> str:
        """Text in, text out: the model's continuation of `prompt` (without the prompt itself).

        `prompt` is a str or a list of chat messages ({"role": ..., "content": ...}). chat=None uses the chat
        template whenever the export has one (messages always need one); chat=False feeds a str as plain text.
        It stops at the export's EOS ids and the tokenizer's eos_token; sampling as in `generate`.
        """
        tok = self.tokenizer
        if chat is None:
            chat = not isinstance(prompt, str) or tok.chat_template is not None
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        elif isinstance(prompt, str):
            ids = tok.encode(prompt)
        else:
            raise ValueError("chat=False takes a str prompt; a list of messages needs the chat template")
        if not ids:
            raise ValueError("the prompt encodes to no tokens; give some text")
        eos = self._eos_ids("auto")
        if tok.eos_token_id is not None and tok.eos_token_id not in eos:
            eos.append(tok.eos_token_id)
        tokens = self.generate([ids], max_new_tokens, eos, temperature=temperature, top_p=top_p, seed=seed)[0]
        # Decode prompt + continuation, then drop the prompt's text: decoding the new tokens alone could lose
        # a leading space (sentencepiece-style decoders strip it from the first token), as transformers' pipeline
        # does it.
        prompt_text = tok.decode(ids, skip_special_tokens=True)
        return tok.decode(tokens.tolist(), skip_special_tokens=True)[len(prompt_text):]

    def weight(self, name: str) -> np.ndarray:
        """The live value of a patchable weight, in PyTorch (out, in) layout, as a copy."""
        slot = self._backend.slots.get(name)
        if slot is None or not slot.patchable:
            known = ", ".join(n for n, s in list(self._backend.slots.items())[:4] if s.patchable)
            raise KeyError(f"{name!r} is not a patchable weight of {self.dir} (e.g. {known}, ...)")
        positions = buffer_positions(slot, np.arange(slot.out * slot.inp))   # any layout, packed or not
        with self._lock.reading():
            return self._backend.flat[positions].reshape(slot.out, slot.inp)

    def close(self) -> None:
        """Stop the background builder and release the sessions; the runtime cannot run afterwards."""
        backend = getattr(self, "_backend", None)
        if backend is not None:
            backend.close()

    def __del__(self):
        # The builder thread holds the backend, not the Runtime: dropping the last Runtime reference stops it.
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"Runtime({str(self.dir)!r}, backend={self.backend_name}, switch_path={self.switch_path!r}, "
                f"policy={self.policy!r}, active={self.active})")


def _ids(input_ids, vocab_size: int | None = None) -> np.ndarray:
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be integer token ids [batch, seq] with seq >= 1, got {ids.dtype}{ids.shape}")
    # ONNX Runtime's Gather silently wraps negative ids, and neither backend promises anything for the others.
    if vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise ValueError(f"input_ids: token id {int(bad)} is outside this model's vocabulary 0..{vocab_size - 1}")
    return ids.astype(np.int64, copy=False)
