"""The ``clsp`` command: one group with a subcommand per stage (imported lazily, so --help is fast)."""

from __future__ import annotations

import importlib

import click

from clsp.errors import Group

# subcommand -> (module, attribute, one-line help)
_COMMANDS = {
    "run": ("clsp.pipeline", "run", "Run a whole experiment from a pipeline.yaml (skips what is done)."),
    "study": ("clsp.study", "study", "CLSP vs baseline over paired seeds per method, with 95% intervals."),
    "ddpm": ("clsp.generate.ddpm_cli", "ddpm", "Train, sample and score unconditional DDPM models."),
    "gen": ("clsp.generate.cli", "gen", "Stage 1: draw synthetic positives into shards (same as clsp-gen)."),
    "shards": ("clsp.shards.cli", "shards", "Inspect, verify and preview a shard directory."),
    "train": ("clsp.train.cli", "train", "Stage 2: contrastive training with synthetic positives (clsp-train)."),
    "eval": ("clsp.evaluate.cli", "evaluate", "Stage 3: evaluate encoders and positives (clsp-eval)."),
    "encoder": ("clsp.train.encoder_cli", "encoder", "Import encoders trained elsewhere (the authors' releases)."),
}


class LazyGroup(Group):
    """The stage commands, imported on first use; errors are one line as in every command."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module, attr, _ = _COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, helptext) for name, (_, _, helptext) in _COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clsp")
def main() -> None:
    """Contrastive Learning with Synthetic Positives: generate -> shards -> train -> evaluate."""


if __name__ == "__main__":
    main()
