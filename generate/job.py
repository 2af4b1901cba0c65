"""The generation job: every anchor of a dataset gets k synthetic positives, written into shards.

Shard ``i`` holds anchors ``[i * shard_size, (i + 1) * shard_size)`` and goes to global worker
``i mod W``, where the workers are the processes of ``accelerate launch`` times the tasks of a job
array (``--num-workers``). The content of a shard depends only on the settings and its index: each
anchor's randomness comes from its own generator seeded from ``(seed, anchor_index)`` and batches
are formed within a shard, so one process and many write the same bytes. Finished shards are recorded
in the manifest with their sha256; a rerun with the same settings skips them and writes the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from clsp.config import DatasetConfig, identity
from clsp.datasets import ImageDataset, dataset_info, get_dataset
from clsp.errors import UserError
from clsp.generate.conditional import check_guidance, check_labels, config_classes, num_classes
from clsp.generate.config import GenerateJob
from clsp.generate.ddim import ddim_scheduler
from clsp.generate.sampler import num_skips, sample_positives
from clsp.generate.scoring import bottleneck_agreement
from clsp.generate.unet import check_compatible, load_unet, resolve_unet, unet_config
from clsp.images import to_float, to_uint8
from clsp.log import Rate
from clsp.runtime import apply_tf32, make_accelerator, progress, resolve_precision
from clsp.shards import schema, verify, writer
from clsp.shards.preview import arrays_png, preview_png
from clsp.shards.reader import MANIFEST
from clsp.shards.store import ShardStore

T = TypeVar("T")
log = logging.getLogger(__name__)
PREVIEW_ANCHORS = 4
PREVIEW = "preview.png"


def anchor_seed(seed: int, anchor_index: int) -> int:
    """The seed of one anchor's generator: a hash of the job seed and the anchor's index (63 bits)."""
    digest = hashlib.sha256(f"clsp-gen:{seed}:{anchor_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def array_worker(num_workers: int | None, worker_index: int | None,
                 env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(num_workers, worker_index) of a job array: as given, else from Slurm's array variables, else (1, 0)."""
    env = os.environ if env is None else env
    if num_workers is None and "SLURM_ARRAY_TASK_COUNT" in env:
        num_workers = int(env["SLURM_ARRAY_TASK_COUNT"])
    if worker_index is None and "SLURM_ARRAY_TASK_ID" in env:
        worker_index = int(env["SLURM_ARRAY_TASK_ID"])
    num_workers = 1 if num_workers is None else num_workers
    worker_index = 0 if worker_index is None else worker_index
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise UserError(f"worker index {worker_index} is outside 0..{num_workers - 1} of {num_workers} workers; "
                        "number Slurm arrays from 0 (--array=0-7), or pass --num-workers with the full array size")
    return num_workers, worker_index


def assigned_shards(num_shards: int, worker: int, num_workers: int, done: set[int]) -> list[int]:
    """The shards global worker ``worker`` writes: ``i mod num_workers == worker``, less the finished ones."""
    return [i for i in range(worker, num_shards, num_workers) if i not in done]


def model_fingerprint(unet: torch.nn.Module, scheduler) -> str:
    """A hash of the U-Net's weights and the noise schedule, so a changed model is never resumed into."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    schedule = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    digest.update(json.dumps(schedule, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def generation_record(cfg: GenerateJob, unet_ref: str, unet_sha256: str, precision: str) -> dict:
    """The manifest's ``generation``: the settings that shape the shards (the dataset's are recorded apart,
    as the manifest's ``dataset``), with the model and the precision as resolved. A rerun resumes shards
    only when it is the same."""
    own = {key: value for key, value in identity(cfg).items() if key not in DatasetConfig.model_fields}
    if own["guidance"] is None:  # an unconditional model's shards keep the record they always had
        del own["guidance"]
    return {**own, "unet": unet_ref, "unet_sha256": unet_sha256, "precision": precision}


class _PositiveDrawer:
    """The model, the data and the settings that turn anchor indices into shard samples."""

    def __init__(self, cfg: GenerateJob, dataset: ImageDataset, unet, scheduler, precision: str):
        self.cfg, self.dataset, self.unet, self.scheduler, self.precision = cfg, dataset, unet, scheduler, precision
        self.labels = dataset.labels()
        self.conditional = cfg.guidance is not None  # each anchor's positives drawn for its label

    def batch(self, indices: list[int]) -> list[schema.ShardSample]:
        images = self.dataset.array(indices)
        device = self.unet.device
        seeds = [anchor_seed(self.cfg.seed, i) for i in indices]
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        anchors = to_float(images, signed=True)
        labels = torch.from_numpy(self.labels[indices]) if self.conditional else None
        positives = to_uint8(sample_positives(
            self.unet, self.scheduler, anchors, self.cfg.candidates, w=self.cfg.interpolation,
            steps=self.cfg.steps, eta=self.cfg.eta, generator=generators, precision=self.precision,
            share_anchor_pass=self.cfg.share_anchor_pass, mix_depth=self.cfg.mix_depth, labels=labels,
            guidance=self.cfg.guidance))
        scores = None
        if self.cfg.scores:  # scored as stored (8-bit), with each anchor's own generator: shards stay W-independent
            scores = bottleneck_agreement(self.unet, self.scheduler, anchors, to_float(positives, signed=True),
                                          generator=generators, precision=self.precision)
        return [schema.ShardSample(anchor_index=i, positives=positives[j], label=int(self.labels[i]), seed=seeds[j],
                                   anchor=images[j] if self.cfg.store_anchors else None,
                                   scores=None if scores is None else scores[j],
                                   condition=int(self.labels[i]) if self.conditional else None,
                                   guidance=self.cfg.guidance)
                for j, i in enumerate(indices)]

    def shard(self, anchors: range, advance: Callable[[int], object]) -> Iterator[schema.ShardSample]:
        """A shard's samples, batch by batch (batches never cross shards, so shards do not depend on W)."""
        for start in range(anchors.start, anchors.stop, self.cfg.batch_size):
            indices = list(range(start, min(start + self.cfg.batch_size, anchors.stop)))
            yield from self.batch(indices)
            advance(len(indices))


def _main_first(accelerator: Accelerator, fn: Callable[[], T], share: bool = False) -> T:
    """Run ``fn`` on the main process first; then the others run it too, or receive its result (``share``).

    A UserError on the main process reaches every process, so no rank waits at a barrier for a main
    process that has already given up.
    """
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as err:
            error = str(err)
    error, shared = broadcast_object_list([error, result if share else None])
    if error is not None:
        raise UserError(error)
    if accelerator.is_main_process:
        return cast(T, result)  # fn()'s result (which may be None): the main process raised above otherwise
    return shared if share else fn()


def _compile(unet) -> None:
    """torch.compile the blocks the sampler calls one by one (compiling ``forward`` would not reach them)."""
    for module in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
        if module is not None:
            module.compile()


def _preview(store: ShardStore, gen: _PositiveDrawer, count: int, done: set[int]) -> None:
    """``preview.png``, the first anchors beside their positives: from shard 0 when it is finished, else drawn now."""
    if 0 in done:
        png = preview_png(store, count, gen.dataset)
    else:
        indices = list(range(count))
        png = arrays_png(gen.dataset.array(indices), np.stack([s.positives for s in gen.batch(indices)]))
    store.write_bytes(PREVIEW, png)


def check_model_fits(unet: str | None, dataset: str, image_size: int | None,
                     guidance: float | None = None) -> list[str]:
    """Refuse a diffusion model that does not fit the images (or ``guidance``: given exactly for a
    class-conditional model), from its config alone: before any image is loaded or resized (at a size the model
    cannot take that would be gigabytes of work for nothing).

    Returns a note when the model is a hub id not in the local cache: then loading it checks the fit."""
    ref = resolve_unet(unet, dataset, conditional=guidance is not None)
    with warnings.catch_warnings():  # diffusers passes hub arguments that huggingface_hub deprecates
        warnings.simplefilter("ignore", UserWarning)
        config = unet_config(ref)
    if config is None:
        return [f"diffusion model {ref} is not in the local cache: its fit to the data is checked when "
                "generation loads it"]
    check_guidance(config_classes(config), guidance, ref)
    info = dataset_info(dataset)
    size = image_size or (info.image_size if info is not None else None)
    if size is not None:  # an image folder's size is known once its first image is read: _load checks it
        check_compatible(config, size)
    return []


def _load(cfg: GenerateJob, device: torch.device):
    """Dataset, model reference, model and scheduler, with every check that can be made before any work."""
    unet_ref = resolve_unet(cfg.unet, cfg.name, conditional=cfg.guidance is not None)
    dataset = get_dataset(cfg.name, split=cfg.split, root=cfg.data_root, image_size=cfg.image_size)
    unet, scheduler = load_unet(unet_ref, device=device)
    check_compatible(unet.config, dataset.image_size)
    check_guidance(num_classes(unet), cfg.guidance, unet_ref)
    if cfg.guidance is not None:  # every anchor's label, before any work
        labels = dataset.labels() if dataset.has_labels else np.full(len(dataset), -1)
        check_labels(num_classes(unet), torch.from_numpy(labels), len(dataset))
    ddim_scheduler(scheduler)  # a scheduler config field the sampler cannot honour is refused here, before any work
    if cfg.mix_depth > num_skips(unet):
        raise UserError(f"--mix-depth {cfg.mix_depth} exceeds the {num_skips(unet)} skip connections of {unet_ref}; "
                        f"pass at most {num_skips(unet)}")
    timesteps = int(scheduler.config.num_train_timesteps)
    if cfg.steps > timesteps:
        raise UserError(f"--steps {cfg.steps} exceeds the model's {timesteps} training timesteps; "
                        f"pass --steps {timesteps} or fewer")
    if cfg.unet is None:  # the dataset's known model: recorded by name, so reinstalling the package keeps the shards
        unet_ref = f"default for {cfg.name}: {Path(unet_ref).name if Path(unet_ref).is_dir() else unet_ref}"
    elif Path(unet_ref).expanduser().is_dir():
        unet_ref = str(Path(unet_ref).expanduser().resolve())
    return dataset, unet_ref, unet, scheduler


def run_generation(cfg: GenerateJob, echo: Callable[[str], object] = print) -> dict:
    """Generate the shards this process owns, wait for all, verify on the main process; returns a summary.

    Problems found by the final verification are an error naming the first (rerunning rewrites them)."""
    num_workers, worker_index = array_worker(cfg.num_workers, cfg.worker_index)
    check_model_fits(cfg.unet, cfg.name, cfg.image_size, cfg.guidance)
    store = ShardStore.open(cfg.shards)  # a bad URL, a missing extra or missing credentials: before any work
    store.require_writable()
    store.probe()
    made, fresh = store.missing_directories(), not store.exists(MANIFEST)
    accelerator = make_accelerator()  # device placement and process group only: the sampler does its own autocast
    apply_tf32(cfg.tf32)
    try:
        return _run(cfg, accelerator, num_workers, worker_index, echo)
    except UserError:
        if fresh and num_workers * accelerator.num_processes == 1:  # alone: no other writer relies on the manifest
            writer.discard_unstarted(cfg.shards, made=made, also=(PREVIEW,))
        raise
    finally:
        accelerator.end_training()


def _run(cfg: GenerateJob, accelerator: Accelerator, num_workers: int, worker_index: int,
         echo: Callable[[str], object]) -> dict:
    # the main process loads first (it downloads what is missing), then the others read its copies
    dataset, unet_ref, unet, scheduler = _main_first(accelerator, lambda: _load(cfg, accelerator.device))
    precision = resolve_precision(cfg.precision, accelerator.device)
    num_anchors = min(cfg.limit or len(dataset), len(dataset))
    world = num_workers * accelerator.num_processes
    rank = worker_index * accelerator.num_processes + accelerator.process_index

    def start() -> tuple[schema.Manifest, set[int]]:
        generation = generation_record(cfg, unet_ref, model_fingerprint(unet, scheduler), precision)
        manifest = writer.init_manifest(cfg.shards, dataset=dataset.describe(), generation=generation,
                                        num_anchors=num_anchors, shard_size=cfg.shard_size, overwrite=cfg.overwrite)
        return manifest, writer.completed_shards(cfg.shards)

    manifest, done = _main_first(accelerator, start, share=True)
    total = manifest.num_shards
    mine = assigned_shards(total, rank, world, done)
    if cfg.compile:
        _compile(unet)
    gen = _PositiveDrawer(cfg, dataset, unet, scheduler, precision)
    if accelerator.is_main_process:
        log.info(f"generating {num_anchors} anchors x {cfg.candidates} candidates into {total} shards in {cfg.shards} "
             f"({len(done)} already complete; {world} worker{'s' if world > 1 else ''}, {precision}, "
             f"{accelerator.device})")
        if cfg.preview and rank == 0:
            store = ShardStore.open(cfg.shards)
            _preview(store, gen, min(PREVIEW_ANCHORS, num_anchors), done)
            log.info(f"wrote {store.where(PREVIEW)}: check the positives before the long run")

    began = time.perf_counter()
    anchors = sum(len(manifest.anchor_range(i)) for i in mine)
    rate, finished = Rate(anchors), 0
    with progress(total=anchors, desc="clsp-gen", main_process=accelerator.is_main_process, unit="anchor") as bar:
        for count, index in enumerate(mine, 1):
            writer.write_shard(cfg.shards, index, gen.shard(manifest.anchor_range(index), bar.update),
                               rank=rank, world_size=world)
            finished += len(manifest.anchor_range(index))
            if bar.disable:  # no terminal (a batch job): one line per shard instead of the bar
                log.info(f"shard {index} written ({count}/{len(mine)} of this process): anchors {finished}/{anchors}, "
                         f"{rate.describe(finished, 'anchors')}")
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - began
    written = gather_object([(len(mine), anchors)])
    summary = {"shards_written": sum(s for s, _ in written), "anchors_written": sum(a for _, a in written),
               "shards_skipped": len(done), "num_shards": total, "seconds": seconds, "problems": []}
    if accelerator.is_main_process:
        complete = len(writer.completed_shards(cfg.shards))
        if num_workers == 1 or complete == total:
            summary["problems"] = verify.verify_shards(cfg.shards)
            checked = f"verify: {len(summary['problems']) or 'no'} problems"
        else:  # other array tasks are still writing; the last one to finish verifies the whole set
            checked = f"{complete} of {total} shards complete so far"
        per_second = summary["anchors_written"] / seconds if seconds > 0 else 0.0
        echo(f"wrote {summary['shards_written']} shards ({summary['anchors_written']} anchors x {cfg.candidates} "
             f"candidates) to {cfg.shards} in {seconds:.1f} s ({per_second:.2f} anchors/s); "
             f"{summary['shards_skipped']} were already complete; {checked}")
    problems = broadcast_object_list([summary["problems"]])[0]
    if problems:
        raise UserError(f"{len(problems)} problems in {cfg.shards} after generation (first: {problems[0]}); rerun "
                        "the same command to rewrite the damaged shards")
    return summary
