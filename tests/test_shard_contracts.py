"""Malformed, hostile or inconsistent shard directories: each is one ``ShardError`` line naming the file.

Every case is checked through the library (the error type and the file it names) and through
``clsp shards info|verify|preview`` (exit 1, one ``Error:`` line, no traceback).
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner

from clsp.cli import main
from clsp.errors import ShardError
from clsp.shards import reader, schema, verify, writer
from support import reseal

K, SIZE = 2, 8
DATASET = {"name": "digits", "split": "train", "size": 40, "fingerprint": "0123456789abcdef", "image_size": SIZE,
           "num_classes": 10}


def positives_of(anchor: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(anchor).integers(0, 256, (K, size, size, 3), dtype=np.uint8)


def sample_of(anchor: int) -> schema.ShardSample:
    """A sample storing its anchor image, so ``clsp shards preview`` needs no dataset."""
    return schema.ShardSample(anchor, positives_of(anchor), label=anchor % 10, seed=anchor,
                              anchor=positives_of(anchor + 1000)[0])


def make_shards(directory: Path, num_anchors: int = 16, shard_size: int = 8) -> schema.Manifest:
    manifest = writer.init_manifest(directory, dataset=DATASET, generation={"w": 0.1}, num_anchors=num_anchors,
                                    shard_size=shard_size)
    for i in range(manifest.num_shards):
        writer.write_shard(directory, i, (sample_of(a) for a in manifest.anchor_range(i)))
    return reader.read_manifest(directory)


def edit_manifest(directory: Path, change) -> Path:
    """Apply ``change`` to the manifest's JSON and write it back (as a hand edit or a corrupt copy would)."""
    path = directory / reader.MANIFEST
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def rewrite_shard(directory: Path, index: int, raws: list[dict]) -> Path:
    """Replace shard ``index`` by hand-made members, re-recording its size and hash so it 'verifies'."""
    path = directory / schema.shard_name(index)
    with wds.TarWriter(str(path), encoder=False) as tar:
        for raw in raws:
            tar.write(raw)
    reseal(directory, index)
    return path


def raws_of(manifest: schema.Manifest, index: int) -> list[dict]:
    return [schema.encode_sample(sample_of(a)) for a in manifest.anchor_range(index)]


def with_record(raw: dict, **fields) -> dict:
    record = json.loads(raw["json"])
    record.update(fields)
    return {**raw, "json": json.dumps(record).encode()}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` RGB, followed by a tiny (wrong) image stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def cli(*args) -> object:
    return CliRunner().invoke(main, ["shards", *map(str, args)])


def assert_one_error_line(directory: Path, needle: str, commands=("info", "verify", "preview")) -> None:
    """Each command exits 1 with exactly one ``Error:`` line containing ``needle`` and no traceback."""
    for command in commands:
        extra = ["--out", directory / "p.png"] if command == "preview" else []
        result = cli(command, directory, *extra)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1, (command, result.output)
        assert "Traceback" not in result.output and not isinstance(result.exception, (TypeError, AttributeError))
        assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], (command, result.output)


def assert_verify_lists(directory: Path, needle: str) -> None:
    """``clsp shards verify`` lists the problem and ends with one ``Error:`` line, exit 1, no traceback."""
    result = cli("verify", directory)
    lines = result.output.rstrip().splitlines()
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert [line for line in lines if line.startswith("Error: ")] == [lines[-1]]
    assert any(line.startswith("  - ") and needle in line for line in lines), result.output


MANIFEST_CASES = {
    "shards is a list": (lambda m: m.update(shards=[]), "shards: Input should be an object"),
    "shard_size 0": (lambda m: m.update(shard_size=0), "shard_size: Input should be greater than or equal to 1"),
    "dataset is a string": (lambda m: m.update(dataset="digits"), "dataset: Input should be"),
    "num_anchors a string": (lambda m: m.update(num_anchors="16"), "num_anchors: Input should be a valid integer"),
    "bytes a float": (lambda m: m["shards"]["shard-000000.tar"].update(bytes=1.5), "bytes: Input should be a valid"),
    "more anchors than the dataset": (lambda m: m.update(num_anchors=41, num_shards=6), "exceeds the dataset's 40"),
    "entry outside the directory": (lambda m: m["shards"].update({"../elsewhere.tar": m["shards"]["shard-000000.tar"]}),
                                    "String should match pattern"),
    "entry of another index": (lambda m: m["shards"].update({"shard-000001.tar": m["shards"]["shard-000000.tar"]}),
                               "records shard index 0"),
    "candidates 1e9": (lambda m: m["shards"]["shard-000000.tar"].update(candidates=10**9),
                       "candidates: Input should be less than or equal to 64"),
    "unknown field": (lambda m: m.update(surprise=1), "surprise: Extra inputs are not permitted"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_malformed_manifest_is_one_line_naming_it(tmp_path, case):
    make_shards(tmp_path)
    change, needle = MANIFEST_CASES[case]
    path = edit_manifest(tmp_path, change)
    with pytest.raises(ShardError, match=rf"the shard manifest is malformed, .*\({path}\): regenerate") as err:
        reader.read_manifest(tmp_path)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert_one_error_line(tmp_path, needle)


def test_deep_or_huge_manifest_is_refused_before_parsing(tmp_path):
    make_shards(tmp_path)
    path = tmp_path / reader.MANIFEST
    path.write_bytes(b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(ShardError, match=rf"recursion limit exceeded.*\({path}\)"):
        reader.read_manifest(tmp_path)
    assert_one_error_line(tmp_path, "recursion limit exceeded")
    with open(path, "wb") as f:
        f.truncate(schema.MAX_MANIFEST_BYTES + 1)
    with pytest.raises(ShardError, match=rf"over the {schema.MAX_MANIFEST_BYTES}-byte limit \({path}\)"):
        reader.read_manifest(tmp_path)


RECORD_CASES = {
    "label a list": ({"label": [1]}, "label: Input should be a valid integer"),
    "label Infinity": ({"label": float("inf")}, "label: Input should be a valid integer"),
    "seed an object": ({"seed": {}}, "seed: Input should be a valid integer"),
    "candidates 1e9": ({"candidates": 10**9}, "candidates: Input should be less than or equal to 64"),
    "anchor_index a string": ({"anchor_index": "3"}, "anchor_index: Input should be a valid integer"),
    "scores of another length": ({"scores": [0.5]}, "1 scores for 2 candidates"),
    "a score outside [-1, 1]": ({"scores": [0.5, 1.5]}, "scores.1: Input should be less than or equal to 1"),
    "a NaN score": ({"scores": [0.5, float("nan")]}, "scores.1: Input should be a finite number"),
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_malformed_sample_record_is_one_line_naming_the_shard(tmp_path, case):
    manifest = make_shards(tmp_path)
    fields, needle = RECORD_CASES[case]
    raws = raws_of(manifest, 0)
    raws[3] = with_record(raws[3], **fields)
    path = rewrite_shard(tmp_path, 0, raws)
    store = reader.ShardDirectory.open(tmp_path)
    with pytest.raises(ShardError, match=rf"sample 000000003 is malformed, .*\({path}\)") as err:
        list(store.samples())
    assert needle in str(err.value)
    assert any(needle in p and "000000003" in p for p in verify.verify_shards(tmp_path))
    assert_one_error_line(tmp_path, needle, commands=("preview",))
    assert_verify_lists(tmp_path, needle)


def test_deeply_nested_sample_record_is_refused(tmp_path):
    manifest = make_shards(tmp_path)
    raws = raws_of(manifest, 0)
    raws[0] = {**raws[0], "json": b"[" * 10_000 + b"]" * 10_000}
    rewrite_shard(tmp_path, 0, raws)
    with pytest.raises(ShardError, match="member 000000000.json is 20000 bytes, over the limit of 16384"):
        list(reader.ShardDirectory.open(tmp_path).samples())
    raws[0] = {**raws[0], "json": b"[" * 5_000 + b"]" * 5_000}
    rewrite_shard(tmp_path, 0, raws)
    with pytest.raises(ShardError, match="recursion limit exceeded"):
        list(reader.ShardDirectory.open(tmp_path).samples())


def test_scores_round_trip_and_old_records_read_as_none(tmp_path):
    manifest = writer.init_manifest(tmp_path, dataset=DATASET, generation={}, num_anchors=4, shard_size=4)
    scores = {a: np.array([0.25, -1.0], dtype=np.float32) for a in (1, 3)}
    writer.write_shard(tmp_path, 0, (schema.ShardSample(a, positives_of(a), scores=scores.get(a))
                                     for a in manifest.anchor_range(0)))
    got = {s.anchor_index: s.scores for s in reader.ShardDirectory.open(tmp_path).samples()}
    assert got[0] is None and got[2] is None and np.array_equal(got[1], scores[1]) and np.array_equal(got[3], scores[3])
    with pytest.raises(Exception, match="scores"):
        writer.write_shard(tmp_path, 0, [schema.ShardSample(0, positives_of(0), scores=np.array([2.0, 0.0]))])


@pytest.mark.parametrize("size", [SIZE * 2, SIZE // 2])
def test_positives_or_anchor_of_another_size_fail_verify_and_reading(tmp_path, size):
    manifest = make_shards(tmp_path)
    raws = raws_of(manifest, 1)
    raws[0]["pos1.png"] = schema.encode_png(positives_of(8, size)[0])
    raws[1]["anchor.png"] = schema.encode_png(positives_of(9, size)[0])
    path = rewrite_shard(tmp_path, 1, raws)
    problems = verify.verify_shards(tmp_path)
    assert sum(f"of {SIZE}x{SIZE}, got RGB {size}x{size}" in p for p in problems) == 2
    with pytest.raises(ShardError, match=rf"sample 000000008: expected an 8-bit RGB PNG of 8x8.*\({path}\)"):
        list(reader.ShardDirectory.open(tmp_path).samples())
    with pytest.raises(ValueError, match="the manifest's image size"):
        writer.write_shard(tmp_path, 1,
                           (schema.ShardSample(a, positives_of(a, size)) for a in manifest.anchor_range(1)))


def test_png_bombs_are_refused_from_their_header(tmp_path):
    manifest = make_shards(tmp_path)
    for width in (20_000, 10_000, SIZE + 1):
        raws = raws_of(manifest, 0)
        raws[2]["pos0.png"] = png_header_only(width, width)
        rewrite_shard(tmp_path, 0, raws)
        with pytest.raises(ShardError, match="sample 000000002") as err:
            list(reader.ShardDirectory.open(tmp_path).samples())
        assert "DecompressionBomb" in str(err.value) or f"got RGB {width}x{width}" in str(err.value)
        assert_one_error_line(tmp_path, "sample 000000002", commands=("preview",))


def test_oversized_member_is_refused_from_the_tar_header(tmp_path):
    manifest = make_shards(tmp_path)
    raws = raws_of(manifest, 0)
    raws[0]["pos0.png"] = b"\0" * (schema.max_png_bytes((SIZE, SIZE)) + 1)
    path = rewrite_shard(tmp_path, 0, raws)
    with pytest.raises(ShardError, match=rf"member 000000000.pos0.png is \d+ bytes, over the limit.*\({path}\)"):
        list(reader.ShardDirectory.open(tmp_path).samples())


def test_compressed_shard_is_refused(tmp_path):
    make_shards(tmp_path)
    path = tmp_path / schema.shard_name(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("000000000.json")
        big = b" " * (4 << 20)  # compresses to a few KB
        info.size = len(big)
        tar.addfile(info, io.BytesIO(big))
    path.write_bytes(gzip.compress(buffer.getvalue()))
    reseal(tmp_path, 0)
    with pytest.raises(ShardError, match=rf"shard is gzip-compressed \({path}\)"):
        list(reader.ShardDirectory.open(tmp_path).samples())
    assert any("gzip-compressed" in p for p in verify.verify_shards(tmp_path))
    assert_verify_lists(tmp_path, "gzip-compressed")
    assert_one_error_line(tmp_path, "gzip-compressed", commands=("preview",))


def test_damaged_shards_are_errors_for_readers_never_partial_results(tmp_path):
    manifest = make_shards(tmp_path)
    path = tmp_path / schema.shard_name(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4 // 512 * 512])  # cut at a block boundary: tarfile reads it silently
    store = reader.ShardDirectory.open(tmp_path)
    with pytest.raises(ShardError, match=rf"shard is damaged or altered, \d+ bytes, .*\({path}\)"):
        list(store.samples())
    assert store.verified_shards() == {0}
    reseal(tmp_path, 1)  # even a matching hash does not make a short shard whole
    with pytest.raises(ShardError, match=rf"(truncated|lacks pos|holds \d+ of its 8 anchors).*\({path}\)"):
        list(reader.ShardDirectory.open(tmp_path).samples())
    with tarfile.open(path, "w"):
        pass  # an empty tar
    reseal(tmp_path, 1)
    with pytest.raises(ShardError, match=rf"shard holds 0 of its 8 anchors \({path}\)"):
        list(reader.ShardDirectory.open(tmp_path).samples())
    assert len(manifest.shards) == 2


def test_samples_out_of_order_or_from_another_shard_are_refused(tmp_path):
    manifest = make_shards(tmp_path)
    raws = raws_of(manifest, 1)
    raws[0], raws[1] = raws[1], raws[0]
    path = rewrite_shard(tmp_path, 1, raws)
    with pytest.raises(ShardError, match=rf"anchor 9 where its range 8-15 has 8 \({path}\)"):
        list(reader.ShardDirectory.open(tmp_path).samples())


def test_manifest_claiming_more_anchors_than_the_dataset_is_refused_where_it_is_loaded(tmp_path):
    from clsp.datasets import get_dataset

    digits = get_dataset("digits")
    writer.init_manifest(tmp_path, dataset={**digits.describe(), "size": len(digits) + 10}, generation={},
                         num_anchors=len(digits) + 5, shard_size=1000)
    with pytest.raises(ShardError, match=rf"claims {len(digits) + 5} anchors.*has {len(digits)}"):
        reader.load_dataset(reader.read_manifest(tmp_path))
