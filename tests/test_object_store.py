"""Shards on object storage: a real S3-compatible server (moto) and a read-only HTTP server, both on loopback.

Generation to ``s3://`` must write the bytes a local run writes, resume against the store, and training
from ``s3://`` and ``http://`` must give the encoder that training from the local copy gives. Nothing
here contacts anything but 127.0.0.1: the AWS variables point at the test server, and the instance
metadata service and the user's AWS files are switched off.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from clsp.cli import main as clsp_main
from clsp.evaluate.cli import main as clsp_eval
from clsp.generate.cli import gen
from clsp.pipeline import run as clsp_run
from clsp.shards import reader, schema
from clsp.train.cli import train
from support import GEN, TRAIN, QuietHandler, free_port

BUCKET = "bucket"
URL = f"s3://{BUCKET}/shards"
NUM_SHARDS = 4
# Without these, botocore would also look for credentials in the user's files and at the cloud metadata address.
ISOLATED = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_DEFAULT_REGION": "us-east-1",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; this process's AWS variables point at it."""
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**ISOLATED, **CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "FSSPEC_S3_ENDPOINT_URL"):
            patch.delenv(key, raising=False)
        S3FileSystem.clear_instance_cache()
        fs = S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs, env
        S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def local_shards(one_thread, tmp_path_factory) -> Path:
    """The reference: the same job written to a local directory."""
    shards = tmp_path_factory.mktemp("local") / "shards"
    result = CliRunner().invoke(gen, [*GEN, "--shards", str(shards)])
    assert result.exit_code == 0, result.output
    return shards


@pytest.fixture(scope="module")
def s3_shards(s3, local_shards, one_thread) -> str:
    result = CliRunner().invoke(gen, [*GEN, "--shards", URL])
    assert result.exit_code == 0, result.output
    assert "verify: no problems" in result.output
    return URL


@pytest.fixture(scope="module")
def http_url(s3, s3_shards, tmp_path_factory):
    """A read-only HTTP server (GET and HEAD only) on 127.0.0.1 serving a local copy of the S3 shards: a
    manifest without shards and the records beside it, so the reader must merge them over HTTP too."""
    fs, _ = s3
    served = tmp_path_factory.mktemp("served")
    fs.get(f"{BUCKET}/shards/", str(served), recursive=True)
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def objects(fs, prefix: str = f"{BUCKET}/shards") -> dict[str, bytes]:
    return {path.rsplit("/", 1)[1]: fs.cat_file(path) for path in fs.find(prefix) if "/shard-" in path}


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.glob("shard-*")}


@pytest.mark.slow
def test_generation_to_s3_writes_the_bytes_of_a_local_run_and_verifies(s3, s3_shards, local_shards):
    fs, _ = s3
    assert objects(fs) == files(local_shards)  # every tar and every record, byte for byte
    assert len(objects(fs)) == 2 * NUM_SHARDS
    assert fs.isfile(f"{BUCKET}/shards/preview.png")
    assert not [p for p in fs.find(BUCKET) if ".tmp" in p or ".upload" in p]  # never a partial object
    # the stored manifest has no shard list (no writer updates a shared object); the reader merges the records
    assert reader.read_manifest_file(s3_shards).shards == {}
    assert reader.read_manifest(s3_shards) == reader.read_manifest(local_shards)
    runner = CliRunner()
    verified = runner.invoke(clsp_main, ["shards", "verify", s3_shards])
    assert verified.exit_code == 0 and f"OK: {NUM_SHARDS} shards, 32 anchors in {URL}" in verified.output
    info = runner.invoke(clsp_main, ["shards", "info", s3_shards])
    assert info.exit_code == 0 and f"{NUM_SHARDS} of {NUM_SHARDS} done" in info.output


@pytest.mark.slow
def test_a_rerun_resumes_against_the_store(s3, s3_shards, local_shards, one_thread):
    fs, _ = s3
    copy = f"{BUCKET}/resume"
    fs.copy(f"{BUCKET}/shards/", copy, recursive=True)
    fs.rm([f"{copy}/{schema.shard_name(1)}", f"{copy}/{schema.record_name(1)}"])  # killed before the shard
    fs.rm(f"{copy}/{schema.shard_name(2)}")  # a record whose object is gone
    fs.pipe_file(f"{copy}/{schema.shard_name(3)}", b"\0" * 2048)  # an object that no longer matches its record
    damaged = CliRunner().invoke(clsp_main, ["shards", "verify", f"s3://{copy}"])
    assert damaged.exit_code == 1 and "shard-000001.tar: not written yet" in damaged.output
    assert "shard-000002.tar: missing" in damaged.output and "shard-000003.tar: 2048 bytes" in damaged.output
    result = CliRunner().invoke(gen, [*GEN, "--shards", f"s3://{copy}", "--no-preview"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 shards" in result.output and "1 were already complete" in result.output
    assert objects(fs, copy) == files(local_shards)


@pytest.mark.slow
def test_two_array_tasks_at_once_write_one_consistent_set(s3, s3_shards, local_shards, cli_env):
    fs, env = s3
    url = f"s3://{BUCKET}/array"
    tasks = [subprocess.Popen([sys.executable, "-m", "clsp.generate.cli", *GEN, "--shards", url, "--no-preview",
                               "--num-workers", "2", "--worker-index", str(i)], env={**cli_env, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [task.communicate(timeout=240)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    tars = {name: data for name, data in files(local_shards).items() if name.endswith(".tar")}
    assert {name: data for name, data in objects(fs, f"{BUCKET}/array").items() if name.endswith(".tar")} == tars
    assert {r.index: (r.rank, r.world_size) for r in reader.read_manifest(url).shards.values()} == \
        {i: (i % 2, 2) for i in range(NUM_SHARDS)}  # every record found, each from the task that wrote it


@pytest.mark.slow
def test_training_from_s3_and_http_gives_the_weights_of_training_from_the_local_copy(
        s3, s3_shards, local_shards, http_url, tmp_path, monkeypatch):
    import fsspec.config

    cache = tmp_path / "cache"
    monkeypatch.setitem(fsspec.config.conf, "simplecache", {"cache_storage": str(cache)})
    sources = {"local": str(local_shards), "s3": f"simplecache::{s3_shards}", "http": http_url}
    weights = {}
    for name, shards in sources.items():
        extra = ["--workers", "1"] if name == "s3" else []  # a DataLoader worker: a fork needs its own client
        result = CliRunner().invoke(train, [*TRAIN, *extra, "--shards", shards, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        weights[name] = load_file(str(tmp_path / name / "encoder.safetensors"))
    assert "OK: 4 shards" in CliRunner().invoke(clsp_main, ["shards", "verify", http_url]).output
    for name in ("s3", "http"):
        assert weights[name].keys() == weights["local"].keys()
        assert all(torch.equal(weights[name][k], weights["local"][k]) for k in weights["local"]), name
    assert len(list(cache.iterdir())) >= NUM_SHARDS  # the shards were downloaded once, into the cache
    evaluated = CliRunner().invoke(clsp_eval, ["positives", "--encoder", str(tmp_path / "local"), "--shards",
                                               s3_shards, "--out", str(tmp_path / "eval")])
    assert evaluated.exit_code == 0, evaluated.output


@pytest.mark.slow
def test_the_pipeline_writes_its_shards_to_the_store_and_skips_them_after(s3, tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\nshards: s3://{BUCKET}/pipeline\n"
                      "generate: {candidates: 2, steps: 2, batch_size: 8, shard_size: 8, limit: 16, "
                      "precision: fp32}\n")
    first = CliRunner().invoke(clsp_run, [str(config), "--only", "generate"])
    assert first.exit_code == 0, first.output
    assert reader.read_manifest(f"s3://{BUCKET}/pipeline").recorded == [0, 1]
    again = CliRunner().invoke(clsp_run, [str(config), "--only", "generate"])
    assert again.exit_code == 0 and "generate: done already, skipped" in again.output


@pytest.mark.parametrize("location, message", [
    ("s4://bucket/shards", "unknown storage protocol in 's4://bucket/shards': use a local directory or one of"),
    ("s3://", "'s3://' names no bucket or host; write e.g. s3://bucket/shards"),
    ("s3:/bucket/shards", "looks like a URL with one slash after the protocol; write 's3://bucket/shards'"),
])
def test_a_bad_url_is_one_line(location, message):
    for command, args in ((clsp_main, ["shards", "info", location]), (gen, [*GEN, "--shards", location]),
                          (train, [*TRAIN, "--shards", location, "--out", "unused"])):
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_protocol_whose_extra_is_missing_names_the_install():
    result = CliRunner().invoke(clsp_main, ["shards", "info", "gs://bucket/shards"])
    assert result.output == "Error: gs:// locations need an optional dependency: pip install 'clsp[gcs]'\n"


def test_generation_refuses_a_read_only_http_url_before_any_work():
    result = CliRunner().invoke(gen, [*GEN, "--shards", "http://127.0.0.1:9/shards"])
    assert result.exit_code == 1 and "is read-only (http and https serve shards, they do not store them)" in \
        result.output


def _clsp(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clsp.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_missing_credentials_and_an_unreachable_endpoint_are_one_line(s3, s3_shards, cli_env):
    _, env = s3
    base = {k: v for k, v in cli_env.items() if not k.startswith("AWS_")}
    no_credentials = _clsp({**base, **ISOLATED, "AWS_ENDPOINT_URL": env["AWS_ENDPOINT_URL"]}, "shards", "info", URL)
    unreachable = _clsp({**base, **ISOLATED, **CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
                        "shards", "verify", URL)
    expected = {"no credentials": f"Error: no credentials to reach {URL}/manifest.json: set AWS_ACCESS_KEY_ID",
                "unreachable": f"Error: cannot reach {URL}/manifest.json"}
    for done, message in zip((no_credentials, unreachable), expected.values()):
        assert done.returncode == 1 and done.stderr.startswith(message), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
