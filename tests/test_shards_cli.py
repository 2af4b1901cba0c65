"""``clsp shards info|verify|preview`` through the real ``clsp`` command group."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clsp.cli import main
from clsp.datasets import get_dataset
from clsp.shards import preview, schema, writer
from support import SIZE, K, make_shards, positives_of


def run(*args: str):
    return CliRunner().invoke(main, ["shards", *map(str, args)])


def cell(grid: np.ndarray, row: int, col: int, image_size: int) -> np.ndarray:
    """The pixels of one grid cell, as preview_grid lays them out."""
    side = image_size * max(1, math.ceil(preview.MIN_CELL / image_size))
    x = preview.PAD + col * (side + preview.PAD) + (preview.ANCHOR_GAP if col > 0 else 0)
    y = preview.PAD + row * (side + preview.PAD)
    return grid[y:y + side, x:x + side]


def enlarged(image: np.ndarray) -> np.ndarray:
    scale = max(1, math.ceil(preview.MIN_CELL / image.shape[0]))
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


def test_info_summarises_the_directory(tmp_path):
    make_shards(tmp_path)
    result = run("info", tmp_path)
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines())
    assert lines["fingerprint"] == "0123456789abcdef"
    assert lines["shards"] == "3 of 3 done (10 anchors each)"
    assert lines["anchors"] == "23 of 23"
    assert lines["candidates"] == f"{K} per anchor"
    assert "w=0.1" in lines["generation"] and "steps=100" in lines["generation"]
    assert lines["bytes"].startswith(str(sum(p.stat().st_size for p in tmp_path.glob("*.tar"))))


def test_verify_ok_then_lists_problems_and_exits_1(tmp_path):
    make_shards(tmp_path)
    ok = run("verify", tmp_path)
    assert ok.exit_code == 0 and ok.output.startswith("OK: 3 shards, 23 anchors")
    (tmp_path / "shard-000002.tar").unlink()
    bad = run("verify", tmp_path)
    assert bad.exit_code == 1
    assert "  - shard-000002.tar: missing (the manifest records it)" in bad.output.splitlines()
    assert bad.output.splitlines()[-1].startswith("Error: 2 problem(s)")


def test_preview_with_stored_anchors(tmp_path):
    make_shards(tmp_path)
    out = tmp_path / "grid.png"
    result = run("preview", tmp_path, "--out", out, "--num-anchors", 5)
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out).convert("RGB"))
    side = SIZE * math.ceil(preview.MIN_CELL / SIZE)
    assert grid.shape == (5 * (side + preview.PAD) + preview.PAD,
                          (K + 1) * (side + preview.PAD) + preview.PAD + preview.ANCHOR_GAP, 3)
    assert np.array_equal(cell(grid, 3, 2, SIZE), enlarged(positives_of(3)[1]))


def test_preview_takes_anchors_from_the_dataset(tmp_path):
    dataset = get_dataset("digits")
    manifest = writer.init_manifest(tmp_path, dataset=dataset.describe(), generation={"candidates": 2},
                                    num_anchors=6, shard_size=4)
    images = dataset.array(np.arange(6))
    for i in range(manifest.num_shards):
        writer.write_shard(tmp_path, i, (schema.ShardSample(a, np.stack([255 - images[a], images[a, :, ::-1]]))
                                         for a in manifest.anchor_range(i)))
    out = tmp_path / "digits.png"
    result = run("preview", tmp_path, "--out", out, "--data-root", tmp_path / "data")
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out).convert("RGB"))
    size = dataset.image_size
    assert all(np.array_equal(cell(grid, r, 0, size), enlarged(images[r])) for r in range(6))
    assert np.array_equal(cell(grid, 4, 1, size), enlarged(255 - images[4]))

    manifest_path = tmp_path / "manifest.json"
    edited = json.loads(manifest_path.read_text())
    edited["dataset"]["fingerprint"] = "0" * 16
    manifest_path.write_text(json.dumps(edited))
    refused = run("preview", tmp_path, "--out", out)
    assert refused.exit_code == 1 and "but the shards were made from 0000000000000000" in refused.output


@pytest.mark.parametrize("command", [["info"], ["verify"], ["preview", "--out", "x.png"]])
def test_bad_directory_is_one_error_line(tmp_path, command):
    name, *rest = command
    missing = run(name, tmp_path, *rest)
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert missing.output.strip().splitlines() == [
        f"Error: no manifest.json in {tmp_path}: it is not a shard directory, or generation has not started; "
        f"run clsp-gen first"]
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 7}))
    newer = run(name, tmp_path, *rest)
    assert newer.exit_code == 1 and len(newer.output.strip().splitlines()) == 1
    assert newer.output.startswith("Error: ") and "newer than this clsp understands (1)" in newer.output
    assert newer.output.rstrip().endswith(f"({tmp_path / 'manifest.json'}): upgrade clsp")
