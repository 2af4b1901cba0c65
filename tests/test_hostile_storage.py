"""Small hostile inputs to storage: manifests that claim too much, tars with a member twice, URLs of
protocols clsp does not support, servers that fail or never answer, image files that are bombs, of mixed
sizes or 16-bit, full disks, and weights that do not fit their model.

Each is refused in one ``Error:`` line (or one ``UserError``) that names the file, with nothing existing
changed. Servers run on 127.0.0.1 only, and answer a bounded number of requests.
"""

from __future__ import annotations

import errno
import http.server
import io
import json
import os
import resource
import socket
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from safetensors.torch import load_file, save_file

from clsp.cli import main as clsp_main
from clsp.datasets import get_dataset
from clsp.errors import UserError
from clsp.generate.cli import gen
from clsp.io import atomic_file, write_json_atomic
from clsp.pipeline import run as clsp_run
from clsp.resume import save_checkpoint
from clsp.shards import reader, schema
from clsp.train.backbones import EncoderCard, build_backbone, export_encoder, load_encoder
from clsp.train.cli import train
from support import GEN, TRAIN, QuietHandler, free_port, make_shards, raws_of, reseal

ACCEPTED = "use a local directory or one of file://, s3://, gs://, http://, https:// (optionally after simplecache::)"


def one_error_line(result) -> str:
    """The refusal's only line, after checking it is one: non-zero exit, no traceback, under 300 characters."""
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and not isinstance(result.exception, Exception), result.output
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert len(errors[0]) < 300, errors[0]
    return errors[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- manifests: counts checked before any per-shard loop ------------------------------------------------------

def _claims(directory: Path, anchors: int, shard_size: int, num_shards: int) -> None:
    path = directory / reader.MANIFEST
    data = json.loads(path.read_text())
    data["dataset"]["size"] = anchors
    data.update(num_anchors=anchors, shard_size=shard_size, num_shards=num_shards, shards={})
    path.write_text(json.dumps(data))


def test_a_manifest_claiming_a_billion_shards_is_refused_by_every_reader(tmp_path):
    make_shards(tmp_path)
    _claims(tmp_path, 999_999_999, 1, 999_999_999)
    assert (tmp_path / reader.MANIFEST).stat().st_size < 2000
    before = snapshot(tmp_path)
    for command, args in ((clsp_main, ["shards", "verify", str(tmp_path)]),
                          (clsp_main, ["shards", "info", str(tmp_path)]),
                          (train, [*TRAIN, "--shards", str(tmp_path), "--out", str(tmp_path / "out")])):
        line = one_error_line(CliRunner().invoke(command, args))
        assert f"num_shards: Input should be less than or equal to {schema.MAX_SHARDS}" in line
        assert str(tmp_path / reader.MANIFEST) in line
    assert snapshot(tmp_path) == before


def test_many_planned_shards_are_summarised_in_one_problem_line(tmp_path):
    make_shards(tmp_path)
    _claims(tmp_path, schema.MAX_SHARDS, 1, schema.MAX_SHARDS)
    result = CliRunner().invoke(clsp_main, ["shards", "verify", str(tmp_path)])
    assert result.output.splitlines()[0] == (f"  - shards not written yet (planned, not in the manifest): "
                                             f"0-{schema.MAX_SHARDS - 1} ({schema.MAX_SHARDS} in all)")
    assert one_error_line(result).startswith("Error: 4 problem(s)")  # the others: the three shard files, now stray


def test_a_record_claiming_a_billion_samples_costs_what_its_file_holds(tmp_path):
    make_shards(tmp_path, num_anchors=8, shard_size=8)
    path = tmp_path / reader.MANIFEST
    data = json.loads(path.read_text())
    data["dataset"]["size"] = data["num_anchors"] = data["shard_size"] = 10**9
    record = data["shards"]["shard-000000.tar"]
    record.update(samples=10**9, last_anchor=10**9 - 1)
    path.write_text(json.dumps(data))
    (tmp_path / schema.record_name(0)).write_text(json.dumps(record))
    result = CliRunner().invoke(clsp_main, ["shards", "verify", str(tmp_path)])
    assert "  - shard-000000.tar: 8 samples, the manifest records 1000000000" in result.output
    assert f"  - anchors missing from their shards: 8-{10**9 - 1} ({10**9 - 8} in all)" in result.output
    one_error_line(result)


# ---- a tar member twice --------------------------------------------------------------------------------------

def test_a_shard_holding_a_member_twice_fails_verification_naming_both(tmp_path):
    manifest = make_shards(tmp_path)
    shard = tmp_path / schema.shard_name(0)
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for raw in raws_of(manifest, 0):
            key = raw.pop("__key__")
            members = [(f"{key}.{suffix}", data) for suffix, data in raw.items()]
            if key == schema.sample_key(0):  # a second pos0: the reader would have kept the last one silently
                members.append((f"{key}.pos0.png", raw["pos1.png"]))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    reseal(tmp_path, 0)
    result = CliRunner().invoke(clsp_main, ["shards", "verify", str(tmp_path)])
    assert f"  - shard-000000.tar: member 000000000.pos0.png appears twice ({shard})" in result.output
    one_error_line(result)
    with pytest.raises(UserError, match=r"member 000000000\.pos0\.png appears twice"):
        list(reader.ShardDirectory.open(tmp_path).read_shard(0))


# ---- an allow-list of storage protocols -----------------------------------------------------------------------

@pytest.mark.parametrize("location", ["memory://shards", "simplecache::memory://shards", "ftp://127.0.0.1/shards",
                                      "github://owner:repo@/shards", "data:text/plain,shards",
                                      "blockcache::s3://bucket/shards"])
def test_a_protocol_outside_the_allow_list_is_refused_by_every_command(location, tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "shards": location}))
    for command, args in ((clsp_main, ["shards", "info", location]), (clsp_main, ["shards", "verify", location]),
                          (gen, [*GEN, "--shards", location]),
                          (train, [*TRAIN, "--shards", location, "--out", str(tmp_path / "out")]),
                          (clsp_run, [str(config), "--check"])):
        line = one_error_line(CliRunner().invoke(command, args))
        assert line == f"Error: unknown storage protocol in {location!r}: {ACCEPTED}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml"]


def test_simplecache_before_an_allowed_protocol_is_accepted(tmp_path):
    make_shards(tmp_path)
    result = CliRunner().invoke(clsp_main, ["shards", "verify", f"simplecache::file://{tmp_path}"])
    assert result.exit_code == 0 and result.output.startswith("OK: 3 shards"), result.output


# ---- remote reads: timeouts and HTTP statuses -----------------------------------------------------------------

class StatusHandler(QuietHandler):
    """500 for everything, except /loop/..., which redirects to itself."""

    def do_GET(self) -> None:
        looping = self.path.startswith("/loop/")
        self.send_response(302 if looping else 500)
        if looping:
            self.send_header("Location", self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET


@contextmanager
def status_server():
    """A loopback server that answers at most 200 requests, and stops when the block ends."""
    server, done = http.server.HTTPServer(("127.0.0.1", 0), StatusHandler), threading.Event()
    server.timeout = 0.1

    def serve() -> None:
        for _ in range(200):
            if done.is_set():
                break
            server.handle_request()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        done.set()
        thread.join()
        server.server_close()


def test_http_statuses_redirect_loops_and_bad_ports_are_named_as_such():
    with status_server() as url:
        expected = {f"{url}/shards": f"Error: HTTP 500 from {url}/shards/manifest.json: check the URL and the server",
                    f"{url}/loop/shards": f"Error: too many redirects from {url}/loop/shards/manifest.json "
                                          f"(a redirect loop?): check the URL",
                    "http://127.0.0.1:99999/shards": "Error: http://127.0.0.1:99999/shards/manifest.json is not a "
                                                     "valid URL (Port out of range 0-65535): check it"}
        for location, message in expected.items():
            assert one_error_line(CliRunner().invoke(clsp_main, ["shards", "verify", location])) == message


def test_a_server_that_never_answers_is_one_line_after_the_timeout(monkeypatch):
    monkeypatch.setenv("CLSP_STORAGE_TIMEOUT", "1")
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/shards"
        for args in (["shards", "verify", url], ["shards", "info", url]):
            line = one_error_line(CliRunner().invoke(clsp_main, args))
            assert line == (f"Error: no answer from {url}/manifest.json within 1 s: check the URL and the network, "
                            f"or set CLSP_STORAGE_TIMEOUT (seconds) higher")


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan"])
def test_a_bad_storage_timeout_is_one_line(monkeypatch, value):
    monkeypatch.setenv("CLSP_STORAGE_TIMEOUT", value)
    line = one_error_line(CliRunner().invoke(clsp_main, ["shards", "info", f"http://127.0.0.1:{free_port()}/x"]))
    assert line.startswith(f"Error: CLSP_STORAGE_TIMEOUT={value!r} is not a number of seconds in (0, 86400]")


def test_a_local_path_is_never_told_to_check_credentials(tmp_path, monkeypatch):
    def denied(self, path, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(LocalFileSystem, "info", denied)
    line = one_error_line(CliRunner().invoke(clsp_main, ["shards", "info", str(tmp_path)]))
    assert line.startswith(f"Error: access denied to {tmp_path}/manifest.json") and "credentials" not in line
    assert line.endswith("check the file permissions")


# ---- image folders ---------------------------------------------------------------------------------------------

def _folder(root: Path, images: dict[str, Image.Image]) -> Path:
    for name, image in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    return root


def test_images_of_different_sizes_are_refused_unless_resized(tmp_path, tiny_model_dir):
    folder = _folder(tmp_path / "mixed", {"a/1.png": Image.new("RGB", (8, 8)), "b/2.png": Image.new("RGB", (8, 8)),
                                          "b/3.png": Image.new("RGB", (12, 10))})
    result = CliRunner().invoke(gen, [*GEN[2:], "--dataset", f"imagefolder:{folder}", "--unet", str(tiny_model_dir),
                                      "--shards", str(tmp_path / "s")])
    assert one_error_line(result) == (f"Error: imagefolder {folder}: b/3.png is 12x10 but a/1.png is 8x8; images must "
                                      f"be square and of one size, or pass --image-size N to resize them all")
    assert not (tmp_path / "s").exists()
    resized = get_dataset(f"imagefolder:{folder}", image_size=8)
    assert {resized[i][0].size for i in range(3)} == {(8, 8)}


def test_a_decompression_bomb_png_is_one_line_naming_it(tmp_path, tiny_model_dir):
    folder = _folder(tmp_path / "bomb", {"ok.png": Image.new("RGB", (8, 8)), "big.png": Image.new("1", (14000, 13000))})
    assert (folder / "big.png").stat().st_size < 100_000  # 182 million pixels declared in a few KB
    result = CliRunner().invoke(gen, [*GEN[2:], "--dataset", f"imagefolder:{folder}", "--unet", str(tiny_model_dir),
                                      "--shards", str(tmp_path / "s")])
    assert one_error_line(result).startswith(f"Error: image {folder / 'big.png'} declares over 16777216 pixels")


def test_an_image_over_the_pixel_budget_but_under_pillows_is_refused_from_its_header(tmp_path):
    folder = _folder(tmp_path / "wide", {"wide.png": Image.new("1", (8192, 4096))})
    with pytest.raises(UserError, match=r"wide\.png is 8192x4096, over the limit of 16777216 pixels"):
        get_dataset(f"imagefolder:{folder}")


def test_a_16_bit_grey_png_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257, 25700, 65535], [1000, 32896, 65278, 128]] * 2, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as stored:
        assert stored.mode == "I;16"  # what the loader is given: converting this to RGB would clip to white
    image = np.asarray(get_dataset(f"imagefolder:{tmp_path}")[0][0])
    expected = np.round(values / 257).astype(np.uint8)
    assert image.shape == (4, 4, 3) and (image == expected[..., None]).all()
    assert expected[0].tolist() == [0, 1, 100, 255]


# ---- write failures ------------------------------------------------------------------------------------------------

@contextmanager
def file_size_limit(limit: int):
    """``ulimit -f``: writes past ``limit`` bytes fail with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_checkpoint_over_the_file_size_limit_leaves_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"w": torch.zeros(4)}, {"lr": 0.1})
    before = path.read_bytes()
    with file_size_limit(16384), pytest.raises(UserError) as refused:
        save_checkpoint(path, {"w": torch.zeros(100_000)}, {"lr": 0.1})
    assert str(refused.value) == (f"cannot write {path} (File too large); it is unchanged: free space, raise the "
                                  f"file-size limit (ulimit -f) or choose another path")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_full_disk_while_a_command_writes_is_one_line_and_changes_nothing(tmp_path):
    shards = tmp_path / "shards"
    make_shards(shards)
    out = tmp_path / "preview.png"
    out.write_bytes(b"the previous preview")
    with file_size_limit(2048):
        result = CliRunner().invoke(clsp_main, ["shards", "preview", str(shards), "--out", str(out)])
    assert one_error_line(result) == (f"Error: cannot write {out} (File too large); it is unchanged: free space, "
                                      f"raise the file-size limit (ulimit -f) or choose another path")
    assert out.read_bytes() == b"the previous preview"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.png", "shards"]


def test_no_space_left_while_writing_json_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"old": 1})

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", full)
    with pytest.raises(UserError, match=rf"^cannot write {path} \(No space left on device\); it is unchanged"):
        write_json_atomic(path, {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1} and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_other_errors_inside_an_atomic_write_pass_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_file(tmp_path / "a.bin") as stream:
        stream.write(b"partial")
        (tmp_path / "missing").read_bytes()  # an error of reading something else, not of the write
    assert list(tmp_path.iterdir()) == []


# ---- weights that do not fit ----------------------------------------------------------------------------------------

def test_encoder_weights_that_do_not_fit_name_the_tensors(tmp_path):
    net = build_backbone("resnet-narrow", "small")
    export_encoder(net, tmp_path, EncoderCard(backbone="resnet-narrow", feature_dim=64))
    state = load_file(str(tmp_path / "encoder.safetensors"))
    state["conv1.weight"] = state["conv1.weight"][:, :1].contiguous()
    state["extra.bias"] = state.pop("bn1.bias")
    save_file(state, str(tmp_path / "encoder.safetensors"))
    with pytest.raises(UserError) as refused:
        load_encoder(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"the weights in {tmp_path / 'encoder.safetensors'} do not fit: ")
    assert "bn1.bias missing; extra.bias unexpected; conv1.weight is [" in message and len(message) < 300


def test_a_rerun_of_a_killed_convert_removes_its_staged_folder_and_keeps_a_live_ones(tmp_path):
    import subprocess
    import sys

    from authors_reference import reference_model, run_convert, write_artefacts
    from clsp.io import _HOST

    ckpt, config = write_artefacts(tmp_path / "in", reference_model().state_dict())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    killed = tmp_path / f".model.staged.tmp-{dead}@{_HOST}"  # what a convert killed mid-write leaves
    live = tmp_path / f".model.staged.tmp-{os.getppid()}@{_HOST}"  # another writer, still running
    for staged in (killed, live):
        staged.mkdir()
        (staged / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1000)
    result = run_convert(ckpt, config, tmp_path / "model")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model" / "conversion.json").is_file()
    assert not killed.exists() and live.is_dir()


def test_a_silent_server_is_reported_after_about_the_timeout_not_twice_it(monkeypatch):
    monkeypatch.setenv("CLSP_STORAGE_TIMEOUT", "2")
    with socket.socket() as silent:  # HEAD times out, and fsspec would then try GET: the timeout bounds both
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/shards"
        started = time.monotonic()
        line = one_error_line(CliRunner().invoke(clsp_main, ["shards", "verify", url]))
        elapsed = time.monotonic() - started
    assert line.startswith(f"Error: no answer from {url}/manifest.json within 2 s"), line
    assert 1.9 < elapsed < 3.5, f"{elapsed:.1f} s"


# ---- what clsp shards import reads: one regular .npy file, checked before the manifest -------------------------

def _import(tmp_path: Path, source: Path, *extra: str):
    return CliRunner().invoke(clsp_main, ["shards", "import", str(source), "--dataset", "digits",
                                          "--shards", str(tmp_path / "out" / "shards"), *extra])


def _positives(path: Path, shape: tuple[int, ...]) -> Path:
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()  # sparse: costs no disk
    return path


def test_a_named_pipe_given_to_import_is_refused_at_once(tmp_path):
    fifo = tmp_path / "positives.npy"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    started = time.monotonic()
    line = one_error_line(_import(tmp_path, fifo))
    assert line == (f"Error: {fifo} is not a regular file (a directory, a named pipe or a device); pass the .npy "
                    f"file itself, copied to disk")
    assert time.monotonic() - started < 10 and sorted(p.name for p in tmp_path.iterdir()) == ["positives.npy"]


@pytest.mark.parametrize("case, expected", [
    ("empty", "cannot read {file} as a .npy array: No data left in file"),
    ("k65", "{file} holds 65 positives per image; a shard holds at most 64: import the first 64"),
])
def test_an_empty_npy_or_k_over_the_schema_is_refused_before_any_manifest(case, expected, tmp_path):
    source = tmp_path / f"{case}.npy"
    if case == "empty":
        source.write_bytes(b"")
    else:
        _positives(source, (get_dataset("digits").__len__(), schema.MAX_CANDIDATES + 1, 16, 16, 3))
    line = one_error_line(_import(tmp_path, source))
    assert line.startswith("Error: " + expected.format(file=source)), line
    assert not (tmp_path / "out").exists()


def test_an_image_size_mismatch_suggests_only_an_image_size_that_would_fit(tmp_path):
    from clsp.shards.import_npy import check_fits

    rows = len(get_dataset("digits"))
    square = one_error_line(_import(tmp_path, _positives(tmp_path / "square.npy", (rows, 2, 8, 8, 3))))
    assert square.endswith("import it for the dataset it was made from (or pass --image-size 8)"), square
    check_fits(np.empty((rows, 2, 8, 8, 3), np.uint8), "square.npy", get_dataset("digits", image_size=8).describe())
    oblong = one_error_line(_import(tmp_path, _positives(tmp_path / "oblong.npy", (rows, 2, 16, 32, 3))))
    assert oblong.endswith("holds 16x32 images but digits's are 16x16; import it for the dataset it was made from")
    assert not (tmp_path / "out").exists()


# ---- hints that say what works ----------------------------------------------------------------------------------

@pytest.mark.parametrize("location, expected", [
    ("file:/data/shards", "'file:/data/shards' looks like a URL with one slash after the protocol; write "
                          "'/data/shards' (or 'file:///data/shards'), or ./file:/data/shards for a local directory"),
    ("http://[::1", "'http://[::1': '::' inside an IPv6 address is read as a chain of protocols; write the address "
                    "in full (e.g. [0:0:0:0:0:0:0:1] for [::1]) or use a host name such as localhost"),
])
def test_a_mistyped_location_is_told_what_to_write(location, expected):
    assert one_error_line(CliRunner().invoke(clsp_main, ["shards", "info", location])) == f"Error: {expected}"


def test_clsp_gen_through_simplecache_into_a_local_folder_is_refused_before_any_work(tmp_path, tiny_model_dir):
    folder = tmp_path / "shards"
    result = CliRunner().invoke(gen, [*GEN, "--unet", str(tiny_model_dir), "--shards", f"simplecache::{folder}"])
    assert one_error_line(result) == (f"Error: simplecache::{folder}: simplecache:: keeps a local copy of what is read "
                                      f"and cannot be written through; write to {folder} itself")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-ddpm"]


# ---- a model whose samples are not finite ----------------------------------------------------------------------

@pytest.fixture
def overflowing_model(tmp_path) -> Path:
    """Finite weights, 1e30 times too large: every sample overflows to infinity and NaN."""
    from support import make_scheduler, make_tiny_unet

    unet = make_tiny_unet()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.mul_(1e30)
    assert all(bool(torch.isfinite(p).all()) for p in unet.parameters())
    unet.save_pretrained(tmp_path / "overflowing")
    make_scheduler().save_pretrained(tmp_path / "overflowing")
    return tmp_path / "overflowing"


NOT_FINITE = "NaN or infinite values in a batch of"


@pytest.mark.parametrize("extra", [[], ["--no-scores", "--no-preview"]], ids=["scores", "no-scores"])
def test_clsp_gen_refuses_a_batch_that_is_not_finite_and_leaves_nothing(extra, tmp_path, overflowing_model):
    result = CliRunner().invoke(gen, [*GEN, "--unet", str(overflowing_model),
                                      "--shards", str(tmp_path / "gen" / "shards"), *extra])
    line = one_error_line(result)
    assert line.startswith("Error: the diffusion model produced ") and NOT_FINITE in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overflowing"]  # no manifest, no empty folders


def test_ddpm_sample_writes_no_black_grid_from_a_model_that_overflows(tmp_path, overflowing_model):
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(clsp_main, ["ddpm", "sample", "--unet", str(overflowing_model), "--out", str(out),
                                            "--num-samples", "2", "--steps", "2", "--device", "cpu"])
    assert NOT_FINITE in one_error_line(result) and not out.exists()


@pytest.mark.parametrize("target", ["dangling", "empty folder"])
def test_a_converted_model_goes_through_a_symbolic_link_or_names_a_dangling_one(tmp_path, target):
    from authors_reference import reference_model, write_artefacts

    ckpt, config = write_artefacts(tmp_path / "in", reference_model().state_dict())
    out, folder = tmp_path / "out", tmp_path / "models" / "converted"
    if target == "empty folder":
        folder.mkdir(parents=True)
    out.symlink_to(folder)
    result = CliRunner().invoke(clsp_main, ["ddpm", "convert", str(ckpt), "--config", str(config), "--out", str(out)])
    if target == "dangling":
        assert one_error_line(result) == (f"Error: {out} is a symbolic link to nothing; remove it, or point it at "
                                          f"a directory")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    else:
        assert result.exit_code == 0, result.output
        assert (folder / "config.json").is_file() and out.is_symlink()
        assert sorted(p.name for p in folder.parent.iterdir()) == ["converted"]  # no staged folder left


def test_an_output_that_is_a_dangling_symbolic_link_is_named_as_one(tmp_path):
    out = tmp_path / "run"
    out.symlink_to(tmp_path / "gone" / "run")
    line = one_error_line(CliRunner().invoke(train, [*TRAIN, "--shards", str(tmp_path / "s"), "--out", str(out)]))
    assert line == (f"Error: File exists ({out}): it is a symbolic link to nothing; remove it, or point it at a "
                    f"directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and out.is_symlink()
