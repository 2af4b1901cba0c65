"""``clsp-gen`` (also ``clsp gen``): stage 1, synthetic positives for every anchor, written into shards.

One process: ``clsp-gen --dataset cifar10 --shards shards/cifar10``. Many processes or nodes:
``accelerate launch -m clsp.generate.cli --dataset cifar10 --shards shards/cifar10``. A Slurm job
array: the same command in every task (``--num-workers``/``--worker-index`` default from Slurm).
"""

from __future__ import annotations

import click

from clsp.errors import Command
from clsp.datasets import DEFAULT_DATA_ROOT
from clsp.runtime import PRECISIONS

_SETTINGS = {"show_default": True, "help_option_names": ["-h", "--help"]}


@click.command(cls=Command, context_settings=_SETTINGS)
@click.option("--dataset", required=True, help="Dataset registry name (digits, cifar10, imagefolder:PATH, ...).")
@click.option("--shards", required=True, type=click.Path(file_okay=False),
              help="Output shard directory; a rerun resumes it.")
@click.option("--unet", default=None, help="Diffusion model folder or hub id [default: the dataset's known model].")
@click.option("--candidates", type=int, default=8, help="Synthetic positives (k) per anchor.")
@click.option("--weight", type=float, default=0.1,
              help="Interpolation weight w: 1 = plain sampling, 0 = anchor bottleneck only.")
@click.option("--steps", type=int, default=100, help="DDIM steps (at most the model's training timesteps).")
@click.option("--eta", type=float, default=0.1, help="DDIM stochasticity (0 = deterministic).")
@click.option("--seed", type=int, default=0, help="Job seed; each anchor's noise comes from (seed, anchor index).")
@click.option("--batch-size", type=int, default=64, help="Anchors per sampler call (each brings k candidates).")
@click.option("--shard-size", type=int, default=1000, help="Anchors per shard.")
@click.option("--split", default=None, help="Dataset split [default: the dataset's training split].")
@click.option("--data-root", default=DEFAULT_DATA_ROOT, help="Where datasets are stored or downloaded.")
@click.option("--image-size", type=int, default=None, help="Resize the images to this size [default: the dataset's].")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              help="auto: bf16 autocast on GPUs and on CPUs with bf16 units, else fp32.")
@click.option("--share-anchor-pass", is_flag=True,
              help="Share the anchor's encoder pass (and noise) among its k candidates: cheaper.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the U-Net blocks (compiling takes minutes: for long GPU runs).")
@click.option("--store-anchors", is_flag=True, help="Also store each anchor image in its sample.")
@click.option("--limit", type=int, default=None, help="Only the first N anchors (for trial runs).")
@click.option("--num-workers", type=int, default=None,
              help="Job-array size [default: SLURM_ARRAY_TASK_COUNT, else 1].")
@click.option("--worker-index", type=int, default=None,
              help="This array task's index [default: SLURM_ARRAY_TASK_ID, else 0].")
@click.option("--overwrite", is_flag=True, help="Replace a shard directory made with other settings.")
@click.option("--preview/--no-preview", default=True,
              help="Write preview.png (the first anchors beside their positives) before the long run.")
def gen(compile_: bool, **kwargs) -> None:
    """Draw k synthetic positives per anchor by interpolated DDIM sampling and write them into shards.

    Resumable: rerun the same command after an interruption and it writes only the missing shards.
    Distributed: shard i goes to worker i mod W over all `accelerate launch` processes and array tasks.
    """
    from clsp.errors import UserError
    from clsp.generate.job import GenerationConfig, run_generation

    summary = run_generation(GenerationConfig(compile=compile_, **kwargs), echo=click.echo)
    if summary["problems"]:
        for problem in summary["problems"]:
            click.echo(f"  {problem}", err=True)
        raise UserError(f"{len(summary['problems'])} problems in {kwargs['shards']} after generation (listed above); "
                        f"rerun the same command to rewrite the damaged shards")


main = gen

if __name__ == "__main__":
    main()
