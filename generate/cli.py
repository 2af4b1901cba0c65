"""``clsp-gen`` (also ``clsp gen``): stage 1, synthetic positives for every anchor, written into shards.

One process: ``clsp-gen --dataset cifar10 --shards shards/cifar10``. Many processes or nodes:
``accelerate launch -m clsp.generate.cli --dataset cifar10 --shards shards/cifar10``. A Slurm job
array: the same command in every task (``--num-workers``/``--worker-index`` default from Slurm).
"""

from __future__ import annotations

import click

from clsp.config import click_options, parse
from clsp.errors import SETTINGS, Command
from clsp.generate.config import GenerateJob


@click.command(cls=Command, context_settings=SETTINGS)
@click_options(GenerateJob)
def gen(**options) -> None:
    """Draw k synthetic positives per anchor by interpolated DDIM sampling and write them into shards.

    Resumable: rerun the same command after an interruption and it writes only the missing shards.
    Distributed: shard i goes to worker i mod W over all `accelerate launch` processes and array tasks.
    """
    from clsp.generate.job import run_generation

    run_generation(parse(GenerateJob, options), echo=click.echo)


main = gen

if __name__ == "__main__":
    main()
