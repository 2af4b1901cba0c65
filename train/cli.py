"""``clsp-train`` / ``clsp train``: stage 2, contrastive training on the shards.

The same command runs on CPU, one GPU, or many (``accelerate launch [--multi_gpu --num_processes N]
-m clsp.train.cli ...``); a rerun with the same ``--out`` resumes from its checkpoint. Every option is a
field of ``clsp.train.config.TrainJob``; unset ones take the method's recipe (its file in ``clsp.train.methods``).
"""

from __future__ import annotations

import click

from clsp.config import click_options, parse
from clsp.errors import SETTINGS, Command
from clsp.train.config import TrainJob


@click.command("train", cls=Command, context_settings=SETTINGS)
@click_options(TrainJob)
def train(**options) -> None:
    """Stage 2: train an encoder contrastively, with synthetic positives from the shards."""
    from clsp.train.trainer import train as run_training

    run_training(parse(TrainJob, options))


main = train

if __name__ == "__main__":
    main()
