"""`shira-edge generate`: try an export, with or without adapters, in one line; prints the generated text.

Device code only (the runtime: numpy, onnxruntime or executorch, tokenizers), so it runs where the export runs.
"""

from __future__ import annotations

import click


def _sampling_flag(ctx, param, value):
    """Bad sampling flags are usage errors, found before the export is loaded (by the runtime's own check)."""
    from shira_edge.runtime.sampling import check_sampling

    try:
        check_sampling(**{param.name: value})
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@click.command("generate")
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("prompt")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A .shira adapter to switch in; repeat it to fuse several.")
@click.option("--scale", "scales", multiple=True, type=float,
              help="Scale of each --adapter, in the same order (default 1 each).")
@click.option("--chat/--no-chat", default=None,
              help="Wrap PROMPT in the model's chat template as a user message (default: when the export has one).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Stop after this many tokens (earlier at the model's end-of-sequence token).")
@click.option("--temperature", type=float, default=0.0, show_default=True, callback=_sampling_flag,
              help="0: greedy (the most likely token each step); above 0: sample, hotter is more random.")
@click.option("--top-p", "top_p", type=float, default=1.0, show_default=True, callback=_sampling_flag,
              help="Sample only from the most likely tokens holding this much probability.")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed for sampling: the same seed gives the same text.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Backend threads (default: its own).")
def generate(export_dir, prompt, adapters, scales, chat, max_new_tokens, temperature, top_p, seed, threads):
    """Generate text from EXPORT_DIR (written by `shira-edge export`) for PROMPT.

    \b
    Examples:
      shira-edge generate out/ "What is the capital of France?"
      shira-edge generate out/ --adapter french.shira "Tell me about Paris."
      shira-edge generate out/ --adapter a.shira --adapter b.shira --scale 1 --scale 0.5 \\
          --temperature 0.7 --top-p 0.9 --seed 0 "Write a haiku about the sea."

    The export must carry a tokenizer (exports of a model whose tokenizer is available do). Several adapters are
    fused: base + scale1 * A + scale2 * B.
    """
    if scales and len(scales) != len(adapters):
        raise click.BadParameter(f"{len(scales)} values for {len(adapters)} --adapter; give one per adapter or none",
                                 param_hint="--scale")
    from shira_edge.runtime import Runtime
    from shira_edge.runtime.manifest import read_manifest

    try:
        # A one-off run: where ONNX falls back to rebuilding sessions, "instant" spares it a background rebuild.
        policy = "instant" if read_manifest(export_dir)["backend"] == "onnxruntime" else "auto"
        with Runtime(export_dir, threads, policy=policy) as rt:
            if adapters:
                rt.switch(list(adapters), list(scales) or None)
            text = rt.generate_text(prompt, max_new_tokens, chat=chat, temperature=temperature, top_p=top_p,
                                    seed=seed)
    except (ValueError, OSError, RuntimeError) as exc:   # the runtime's errors name the file, key or flag
        raise click.ClickException(str(exc)) from None
    click.echo(terminal_safe(text))


def terminal_safe(text: str) -> str:
    """The text comes from the export's vocabulary, untrusted: control characters (a terminal escape, a bidi
    override) arrive escaped, new lines and tabs as they are.

    >>> terminal_safe("\\x1b[2Jhi\\n\\tok")
    '\\\\x1b[2Jhi\\n\\tok'
    """
    from shira_edge.runtime.untrusted import printable

    return "".join(ch if ch.isprintable() or ch in "\n\t" else printable(ch) for ch in text)
