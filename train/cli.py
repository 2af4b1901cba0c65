"""``clsp-train`` / ``clsp train``: stage 2, contrastive training on the shards.

The same command runs on CPU, one GPU, or many (``accelerate launch [--multi_gpu --num_processes N]
-m clsp.train.cli ...`` or ``accelerate launch $(which clsp-train) ...``); a rerun with the same
``--out`` resumes from its checkpoint.
"""

from __future__ import annotations

import click

from clsp.errors import Command
from clsp.datasets import DEFAULT_DATA_ROOT
from clsp.runtime import PRECISIONS
from clsp.train.augment import AUGMENTS, CROP_MIN_SCALE, FLIP
from clsp.train.backbones import BACKBONES
from clsp.train.methods import METHODS
from clsp.train.neighbours import NN_INDEXES
from clsp.train.optim import OPTIMIZERS
from clsp.train.trainer import TrainConfig, train as run_training

_DEFAULTS = "Default per method (batch / lr / optimizer / weight decay, METHOD.md): SimCLR 1024 / 0.5 / sgd / " \
            "1e-4, MoCo 512 / 0.3 / sgd / 1e-4, NNCLR 256 / 0.4 / lars / 1e-5."


@click.command("train", cls=Command, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--shards", required=True, type=click.Path(file_okay=False), help="Shard directory from clsp-gen.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run directory: checkpoint, encoder, TensorBoard logs, summary. A rerun resumes from it.")
@click.option("--method", type=click.Choice(METHODS), default="nnclr", help="Base contrastive method.")
@click.option("--clsp-weight", type=float, default=None,
              help="lambda of the CLSP term; 0 trains the baseline (default: 1.0 SimCLR/NNCLR, 0.5 MoCo).")
@click.option("--epochs", type=int, default=1000)
@click.option("--batch-size", type=int, default=None, help=f"Per process. {_DEFAULTS}")
@click.option("--lr", type=float, default=None, help="Peak learning rate (after warm-up); default: the method's.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None, help="SGD (momentum 0.9) or LARS; default: the method's.")
@click.option("--weight-decay", type=float, default=None, help="Default: the method's.")
@click.option("--warmup-epochs", type=float, default=10.0, help="Linear warm-up from lr 1e-3, then cosine to 0.")
@click.option("--backbone", type=click.Choice(BACKBONES), default="resnet18",
              help="resnet-narrow is a quarter-width ResNet-18 for CPU runs.")
@click.option("--data-root", type=click.Path(), default=DEFAULT_DATA_ROOT, help="Where the real dataset lives.")
@click.option("--augment", type=click.Choice(AUGMENTS), default=None,
              help="device: batched on the training device (kornia); cpu: per image in DataLoader workers "
                   "[default: device on CUDA, else cpu]")
@click.option("--crop-min-scale", type=float, default=CROP_MIN_SCALE,
              help="Smallest crop area (fraction of the image) of RandomResizedCrop, in (0, 1]. 0.08 (METHOD.md) "
                   "suits natural images; on small digits such crops lose the digit: try 0.5 for digits.")
@click.option("--flip/--no-flip", default=FLIP,
              help="Random horizontal flips. Off for digits and text, where a mirror image is another symbol "
                   "(digits: --crop-min-scale 0.5 --no-flip).")
@click.option("--workers", type=int, default=4, help="DataLoader worker processes per rank (0: in-process).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", help="auto: bf16 on GPUs and CPUs with bf16 units.")
@click.option("--sync-bn", is_flag=True, help="Synchronise BatchNorm statistics across processes.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the backbone.")
@click.option("--checkpoint-every", type=int, default=10, help="Checkpoint every N epochs (and at the end).")
@click.option("--checkpoint-steps", type=int, default=0, help="Also checkpoint every N steps within an epoch.")
@click.option("--seed", type=int, default=0)
@click.option("--allow-partial", is_flag=True,
              help="Train on the anchors whose shards are finished when some are missing.")
@click.option("--temperature", type=float, default=0.2)
@click.option("--proj-hidden-dim", type=int, default=None, help="Projector hidden size (default 2048).")
@click.option("--proj-output-dim", type=int, default=None, help="Projector output size (default 256).")
@click.option("--pred-hidden-dim", type=int, default=None, help="NNCLR predictor hidden size (default 4096).")
@click.option("--queue-size", type=int, default=None, help="MoCo queue (32768) / NNCLR support set (65536).")
@click.option("--momentum", type=float, default=0.99, help="MoCo's base momentum-encoder coefficient.")
@click.option("--nn-index", type=click.Choice(NN_INDEXES), default="flat",
              help="NNCLR support-set search: exact, or approximate for large banks.")
@click.option("--mix-anchors", type=int, default=4096,
              help="Anchors read and shuffled together (a batch mixes the shards of its chunk).")
def train(compile_: bool, **options) -> None:
    """Stage 2: train an encoder contrastively, with synthetic positives from the shards."""
    run_training(TrainConfig(compile=compile_, **options))


main = train

if __name__ == "__main__":
    main()
