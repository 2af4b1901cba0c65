"""What several test modules build: tiny real models, shard directories, encoders, command lines.

Test modules import from here (never from each other); fixtures built on these are in conftest.py.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from click.testing import CliRunner

from clsp.io import file_digest
from clsp.shards import reader, schema, writer

REPO = Path(__file__).resolve().parents[1]


# ---- commands ----------------------------------------------------------------------------------------------

def command_env() -> dict[str, str]:
    """Environment for subprocess runs of the commands: fixed threads, offline hub."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")
    return env


def clsp_run(config: Path, env: dict, *overrides: str) -> subprocess.Popen:
    """``clsp run CONFIG [--set KEY=VALUE ...]`` in a fresh process, its output on one pipe."""
    sets = [arg for override in overrides for arg in ("--set", override)]
    return subprocess.Popen([sys.executable, "-m", "clsp.cli", "run", str(config), *sets], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def clsp_train(*args: str, env: dict, harness: str = "") -> subprocess.Popen:
    """Start clsp-train in a fresh process (``harness`` is Python run before the command starts)."""
    code = f"import sys\n{harness}\nfrom clsp.train.cli import main\nmain(sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


# ---- tiny diffusion models and pipelines -------------------------------------------------------------------

def make_tiny_unet(sample_size: int = 16, attention: bool = True, layers_per_block: int = 1):
    """A real diffusers UNet2DModel, small enough for CPU tests (random weights)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    return UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=layers_per_block,
                       block_out_channels=(8, 16), down_block_types=down, up_block_types=up, norm_num_groups=4)


def make_scheduler():
    """The DDPM linear schedule of METHOD.md (1e-4 .. 0.02 over 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def save_tiny_model(directory: Path) -> Path:
    """A diffusers-format model folder (UNet + scheduler config) as ``save_pretrained`` writes it."""
    make_tiny_unet().save_pretrained(directory)
    make_scheduler().save_pretrained(directory)
    return directory


def reduced_config(tmp_path: Path, model_dir: Path, run_dir: Path) -> Path:
    """The repository's default pipeline.yaml, shrunk to seconds: tiny model, few anchors, one epoch."""
    config = yaml.safe_load((REPO / "pipeline.yaml").read_text())
    config["run_dir"] = str(run_dir)
    config["diffusion"] = {"unet": str(model_dir)}
    config["generate"].update(candidates=2, steps=2, batch_size=8, shard_size=8, limit=32, precision="fp32")
    # one epoch: no lambda ramp and a one-epoch warm-up (the default's 5-epoch schedules cannot fit in it)
    config["train"].update(epochs=1, batch_size=8, backbone="resnet-narrow", precision="fp32", workers=0,
                           clsp_lambda_ramp_epochs=0, warmup_epochs=1)
    config["evaluate"].update(linear_epochs=3, embed_plot=False)
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---- generation through clsp-gen ---------------------------------------------------------------------------

LIMIT, GEN_SHARD_SIZE, CANDIDATES = 24, 8, 2
NUM_SHARDS = LIMIT // GEN_SHARD_SIZE
# batch size 4: two sampler calls per shard, so batching within a shard is exercised
JOB = ["--dataset", "digits", "--limit", str(LIMIT), "--shard-size", str(GEN_SHARD_SIZE), "--candidates",
       str(CANDIDATES), "--steps", "3", "--batch-size", "4", "--precision", "fp32"]
# smaller runs of clsp-gen and clsp-train, for stores and hostile storage
GEN = ["--dataset", "digits", "--limit", "32", "--shard-size", "8", "--candidates", "2", "--steps", "2",
       "--batch-size", "8", "--precision", "fp32"]
TRAIN = ["--workers", "0", "--backbone", "resnet-narrow", "--epochs", "1", "--batch-size", "16", "--precision",
         "fp32", "--proj-hidden-dim", "64", "--proj-output-dim", "32"]


def run_gen(shards: Path, model: Path, *extra: str):
    from clsp.generate.cli import gen

    return CliRunner().invoke(gen, [*JOB, "--shards", str(shards), "--unet", str(model), *extra])


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.tar"))}


# ---- hand-made shard directories ---------------------------------------------------------------------------

K, SIZE = 3, 8
DATASET = {"name": "digits", "split": "train", "size": 100, "fingerprint": "0123456789abcdef", "image_size": SIZE,
           "num_classes": 10}
GENERATION = {"w": 0.1, "steps": 100, "eta": 0.1, "candidates": K, "seed": 0}


def positives_of(anchor: int, k: int = K, size: int = SIZE) -> np.ndarray:
    """Deterministic fake positives (full uint8 range, so any lossy step would show)."""
    return np.random.default_rng(anchor).integers(0, 256, (k, size, size, 3), dtype=np.uint8)


def anchor_image(anchor: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(10_000 + anchor).integers(0, 256, (size, size, 3), dtype=np.uint8)


def samples_for(manifest: schema.Manifest, shard_index: int, with_anchor: bool = True):
    for a in manifest.anchor_range(shard_index):
        yield schema.ShardSample(a, positives_of(a), label=a % 10, seed=1000 + a,
                                 anchor=anchor_image(a) if with_anchor else None)


def settings(num_anchors: int = 23, shard_size: int = 10, **generation) -> dict:
    return {"dataset": DATASET, "generation": {**GENERATION, **generation}, "num_anchors": num_anchors,
            "shard_size": shard_size}


def make_shards(directory: Path, with_anchor: bool = True, **kw) -> schema.Manifest:
    manifest = writer.init_manifest(directory, **settings(**kw))
    for i in range(manifest.num_shards):
        writer.write_shard(directory, i, samples_for(manifest, i, with_anchor))
    return reader.read_manifest(directory)


def raws_of(manifest: schema.Manifest, index: int) -> list[dict]:
    """Shard ``index``'s samples as the tar members ``make_shards`` wrote."""
    return [schema.encode_sample(sample) for sample in samples_for(manifest, index)]


def reseal(directory: Path, index: int) -> None:
    """Record the shard file's current size and sha256 in the manifest and its record (as if written so)."""
    path = directory / schema.shard_name(index)
    size, sha256 = file_digest(path)
    manifest = json.loads((directory / reader.MANIFEST).read_text())
    manifest["shards"][path.name].update(bytes=size, sha256=sha256)
    (directory / reader.MANIFEST).write_text(json.dumps(manifest))
    (directory / schema.record_name(index)).write_text(json.dumps(manifest["shards"][path.name]))


# ---- training shards and runs ------------------------------------------------------------------------------

TRAIN_ANCHORS, TRAIN_SHARD_SIZE, TRAIN_K = 40, 12, 3
TRAINER_ANCHORS = 48  # the training runs' shards (the ``trainer_shards`` fixture)


def fabricated_positives(anchor: np.ndarray, index: int, k: int = TRAIN_K) -> np.ndarray:
    """k "synthetic" positives of an anchor: shifted and noised copies (stands in for the generator)."""
    rng = np.random.default_rng(index)
    out = []
    for j in range(k):
        shifted = np.roll(anchor, shift=(j + 1, -j), axis=(0, 1)).astype(np.int16)
        out.append(np.clip(shifted + rng.integers(-20, 21, size=anchor.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def make_train_shards(directory: Path, *, num_anchors: int = TRAIN_ANCHORS, shard_size: int = TRAIN_SHARD_SIZE,
                      shards: list[int] | None = None, dataset_name: str = "digits", with_anchor: bool = False) -> Path:
    """A real shard directory for the first ``num_anchors`` images of a dataset (all shards by default)."""
    from clsp.datasets import get_dataset

    dataset = get_dataset(dataset_name)
    manifest = writer.init_manifest(directory, dataset=dataset.describe(), generation={"fabricated": True},
                                    num_anchors=num_anchors, shard_size=shard_size)
    for index in range(manifest.num_shards) if shards is None else shards:
        anchors = manifest.anchor_range(index)
        images = dataset.array(list(anchors))
        writer.write_shard(directory, index, (
            schema.ShardSample(anchor_index=a, positives=fabricated_positives(img, a), label=int(dataset.labels()[a]),
                               anchor=img if with_anchor else None)
            for a, img in zip(anchors, images)))
    return directory


def tiny(method: str) -> list[str]:
    """A CPU-sized run of ``method``: narrow backbone, small heads, batch 8 (memory banks as the digits recipe's)."""
    return ["--method", method, "--backbone", "resnet-narrow", "--batch-size", "8", "--workers", "0", "--precision",
            "fp32", "--proj-hidden-dim", "64", "--proj-output-dim", "32", "--warmup-epochs", "1", "--lr", "0.1"]


# ---- encoders ----------------------------------------------------------------------------------------------

ENCODER_SIZE = 16


def make_encoder(directory: Path, seed: int = 0, **arch) -> Path:
    """An exported encoder with fixed random weights (``arch``: more of its card)."""
    from clsp.train.backbones import EncoderCard, build_backbone, export_encoder

    torch.manual_seed(seed)
    net = build_backbone("resnet-narrow")
    return export_encoder(net, directory, EncoderCard(backbone="resnet-narrow", stem="small",
                                                      feature_dim=net.feature_dim, image_size=ENCODER_SIZE, **arch))


def unlabelled_train_shards(tmp_path: Path) -> Path:
    """Shards of 16 digits stored as an image folder without labels (for the runs that need labels)."""
    from PIL import Image

    from clsp.datasets import get_dataset

    digits = get_dataset("digits")
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(16):
        Image.fromarray(digits.array([i])[0]).save(folder / f"{i}.png")
    return make_train_shards(tmp_path / "shards", num_anchors=16, shard_size=16, dataset_name=f"imagefolder:{folder}")
