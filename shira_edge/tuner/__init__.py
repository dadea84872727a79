"""shira-edge's SHiRA tuner, on top of PEFT: masks (`masks`), a copy-free SHiRA training layer (`layer`),
adapting a model with input checks (`adapt`) and the training loop (`train`). This file stays torch-free so that
`shira-edge train --help` starts fast.

    >>> from shira_edge.tuner.train import train_adapter             # doctest: +SKIP
    >>> train_adapter("tiny-opt", "notes.txt", "adapter/", mask="wm", r=4, steps=20).eval_loss   # doctest: +SKIP
"""

MASKS = ("rand", "wm", "grad", "snip", "struct")
METHODS = ("shira", "lora")
DEFAULT_TARGETS = ("q_proj", "v_proj")
