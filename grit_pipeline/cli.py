"""The `grit` command line. Subcommands are imported only when invoked, so `grit --help` stays fast."""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click command; each issue's commands live in their own module.
_COMMANDS = {
    "phrases": "grit_pipeline.commands.text:phrases",
    "serialize": "grit_pipeline.commands.text:serialize",
    "ground": "grit_pipeline.commands.ground:ground",
    "build": "grit_pipeline.commands.build:build",
    "audit": "grit_pipeline.commands.audit:audit",
    "inspect": "grit_pipeline.commands.audit:inspect",
    "train": "grit_pipeline.commands.train:train",
    "generate": "grit_pipeline.commands.train:generate",
    "bench": "grit_pipeline.commands.bench:bench",
    "eval": "grit_pipeline.commands.eval:eval_group",
    "export": "grit_pipeline.commands.export:export",
}

_HELP = {
    "phrases": "Noun chunks and referring expressions of captions, as JSON lines.",
    "serialize": "GRIT-20M rows to Kosmos-2 grounded text (location tokens), as JSON lines.",
    "ground": "Ground captions' noun chunks in images; prints GRIT-20M rows.",
    "build": "Build Kosmos-2-ready WebDataset shards from image-text pairs.",
    "audit": "Check a build's shards against its manifest and the invariants.",
    "inspect": "A static HTML gallery of a build's samples and stats.",
    "train": "Train Kosmos-2 on built shards.",
    "generate": "Grounded generation with a trained checkpoint.",
    "bench": "Throughput benchmarks against each stage's limit.",
    "eval": "Grounding benchmarks as the Kosmos-2 paper reports them (Flickr30k Entities, RefCOCO).",
    "export": "Export a build for detector trainers (ODVG, MDETR COCO-style, GRIT-20M parquet).",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use.

    `lazy_commands` maps a name to ("module:attribute", one-line help).
    """

    def __init__(self, *args: object, lazy_commands: dict[str, tuple[str, str]] | None = None, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy_commands = lazy_commands or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        """All subcommand names, sorted."""
        return sorted(self.lazy_commands)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import and return the subcommand `cmd_name`."""
        entry = self.lazy_commands.get(cmd_name)
        if entry is None:
            return None
        module_name, attr = entry[0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List subcommands with short help without importing them."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, self.lazy_commands[name][1]) for name in self.list_commands(ctx)])


@click.group(
    cls=LazyGroup,
    lazy_commands={name: (target, _HELP[name]) for name, target in _COMMANDS.items()},
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="grit-pipeline")
def main() -> None:
    """grit: build GRIT-style grounded image-text corpora and train Kosmos-2 on them."""


if __name__ == "__main__":
    main()
