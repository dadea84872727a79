"""The on-device runtime: numpy plus onnxruntime or executorch, never torch, transformers or peft.

Switch SHiRA adapters in place in an exported model (run `shira-edge export --model tiny-opt -o out/` first):

    >>> import numpy as np
    >>> from shira_edge.runtime import Runtime
    >>> from shira_edge.runtime.shira_format import make_adapter, make_target, write_shira
    >>> rt = Runtime("out/")                              # backend from out/manifest.json
    >>> w = next(w for w in rt.manifest["weights"] if w["patchable"])   # an adapter touching one weight
    >>> _ = write_shira("a.shira", make_adapter("a", [make_target(w["name"], w["shape"], [0, 5, 9],
    ...                 np.float32([0.5, -0.25, 1.0]), base_digest=w["digest"])]))
    >>> base = rt.weight(w["name"])                       # (out, in), a copy
    >>> rt.switch("a.shira")                              # live when it returns
    >>> rt.active
    (('a', 1.0),)
    >>> float(rt.weight(w["name"]).flat[5] - base.flat[5])
    -0.25
    >>> rt.run([[2, 7, 9]]).shape                         # logits [batch, seq, vocab]
    (1, 3, 512)
    >>> rt.generate([[2, 7, 9]], max_new_tokens=4).shape  # greedy with the KV cache, prompt included
    (1, 7)
    >>> rt.switch(["a.shira", "a.shira"], scales=[1.0, 0.5])   # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ValueError: the same adapter is given twice; give it once with the sum of its scales
    >>> rt.switch(None)                                   # the base model again, bit for bit
    >>> bool((rt.weight(w["name"]) == base).all()), rt.active
    (True, ())
    >>> rt.wait_ready()                   # full speed: at once where rt.switch_path == "packed-in-place"
    True
    >>> rt.close()

See docs/runtime.md for the design (packed-in-place switching, its rebuild fallback and policies) and measurements.
"""

from .patch import AdapterMismatch
from .runtime import Runtime

__all__ = ["Runtime", "AdapterMismatch"]
