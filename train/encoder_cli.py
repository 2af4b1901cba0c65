"""``clsp encoder import``: bring encoders trained elsewhere into the exported form ``clsp-eval`` reads."""

from __future__ import annotations

import click

from clsp.config import click_options, parse
from clsp.errors import SETTINGS, Group
from clsp.train.encoder_import import EncoderImportJob


@click.group(cls=Group, context_settings=SETTINGS)
def encoder() -> None:
    """Import encoders trained elsewhere (the authors' released ResNets) for clsp-eval."""


@encoder.command("import", context_settings=SETTINGS)
@click.argument("checkpoint")
@click_options(EncoderImportJob, exclude=("checkpoint",))
def import_(checkpoint: str, **options) -> None:
    """Write the authors' encoder CHECKPOINT (a torchvision ResNet state_dict with their MLP head in fc) as an
    encoder folder: the trunk's weights and a card with their stem and normalisation for the dataset."""
    from clsp.train.encoder_import import import_encoder

    job = parse(EncoderImportJob, {"checkpoint": checkpoint, **options})
    out = import_encoder(job)
    click.echo(f"wrote {out}: the {job.backbone} trunk of {checkpoint} (head fc.0/fc.2 dropped); evaluate it with "
               f"`clsp-eval linear --encoder {out} --dataset {job.dataset}`")
