"""The `shira-edge` command line.

Each command lives in its own module and is imported only when it runs, so `shira-edge --help` and `shira-edge
inspect` start without importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

# command name -> "module:click command object". Order is the order of the workflow.
COMMANDS = {
    "train": "shira_edge.commands.train:train",
    "pack": "shira_edge.commands.pack:pack",
    "inspect": "shira_edge.commands.inspect:inspect_cmd",
    "export": "shira_edge.commands.export:export",
    "generate": "shira_edge.commands.generate:generate",
    "bench": "shira_edge.commands.bench:bench",
}

SHORT_HELP = {
    "train": "Train a SHiRA (or LoRA baseline) adapter; writes a PEFT adapter dir.",
    "pack": "Pack a PEFT SHiRA adapter dir into a compact .shira file.",
    "inspect": "Show what a .shira file holds (header, targets, density, bytes).",
    "export": "Export a base model to ONNX or ExecuTorch with a weight manifest.",
    "generate": "Generate text from an export, with adapters switched in (fused if several).",
    "bench": "CPU latency benchmark: SHiRA switching vs LoRA fusion.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._available(name)]

    @staticmethod
    def _available(name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx, name):
        if name not in COMMANDS or not self._available(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        # Short help from the table above, so listing commands imports none of them.
        rows = [(name, SHORT_HELP[name]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shira-edge")
@click.pass_context
def main(ctx: click.Context) -> None:
    """shira-edge: put SHiRA adapters on phones and edge boxes.

    \b
    Workflow:
      shira-edge train  --model tiny-opt --data notes.txt -o adapter/
      shira-edge pack   adapter/ -o adapter.shira
      shira-edge export --model opt-125m --random-init -o out/
      shira-edge generate out/ --adapter adapter.shira "The capital of France is"
      python -c 'from shira_edge.runtime import Runtime; Runtime("out/").switch("adapter.shira")'
      shira-edge bench  --model opt-125m --random-init --quick -o bench/
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
    quiet_library_noise()


def quiet_library_noise() -> None:
    """Silence library chatter that says nothing to a shira-edge user (torchao's optional CUDA kernels failing to
    load on a CPU machine, torchvision ops the ONNX registry skips, a pytree deprecation), so each command's own
    lines stay readable. Errors still show."""
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)


if __name__ == "__main__":
    main()
