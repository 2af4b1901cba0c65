"""Small hostile inputs to configurations, settings and encoders: bounded, refused in one line, nothing changed.

Each case is a file or value a careless colleague or a hostile one could hand over: a YAML alias bomb, a
100,000-deep nesting, a 6.7 MB file, duplicate keys, another encoding, ``true`` for a number, a lambda that
rounds to nothing, an image size the model cannot take, an encoder with NaN or integer weights. Every one must
end as one short ``Error:`` line, without a traceback, leaving every existing file as it was.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

from clsp.errors import UserError, short
from clsp.pipeline import Pipeline, Stage, load_config, run
from clsp.train.config import TrainSettings
from clsp.yamlio import MAX_ALIASES, MAX_BYTES, MAX_DEPTH, MAX_NODES

ROOT = Path(__file__).resolve().parents[1]
MEMORY_BUDGET = 500 << 20


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(result: Result, exit_code: int = 1) -> str:
    """The one ``Error:`` line of a refused command (asserting there is exactly one, short, and no traceback)."""
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and len(errors[0]) < 300, result.output[:2000]
    assert "Traceback" not in result.output
    return errors[0]


def _alias_bomb() -> str:
    """The 500-byte "billion laughs": nine levels of nine aliases, 2 * 9**9 values once expanded."""
    levels = ["a0: &a0 [x, x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    return "\n".join(levels + ["run_dir: *a9"]) + "\n"


HOSTILE_YAML = {
    "alias-bomb": (_alias_bomb(), f"more than {MAX_NODES} values"),
    "deep": ("run_dir: " + "[" * 100_000 + "]" * 100_000 + "\n", f"nested more than {MAX_DEPTH} levels"),
    "400k-runs": ("train:\n  runs:\n" + "".join(f"    r{i}: 0.0\n" for i in range(400_000)), f"{MAX_BYTES}-byte"),
    "300k-list": ("run_dir: [" + ", ".join(["1"] * 300_000) + "]\n", f"more than {MAX_NODES} values"),
    "many-aliases": ("a: &a 1\nb: [" + ", ".join(["*a"] * (MAX_ALIASES + 1)) + "]\n", f"more than {MAX_ALIASES} alias"),
    "duplicate-key": ("train:\n  epochs: 1\n  epochs: 500\n", "line 3: duplicate key 'epochs'"),
    "bool-for-float": ("generate:\n  interpolation: true\n", "'generate.interpolation': needs a number"),
    "bool-for-int": ("train:\n  epochs: true\n", "'train.epochs': needs a number"),
    "bool-for-lambda": ("train:\n  runs: {clsp: true, baseline: 0}\n", "'train.runs': needs a number"),
    "tiny-lambda": ("train:\n  runs: {clsp: 1.0e-320, baseline: 0}\n", "lambda must be 0 (the baseline) or at least"),
    "5k-list": ("run_dir: [" + ", ".join(["1"] * 5_000) + "]\n", "'run_dir': input should be a valid string"),
}


@pytest.mark.parametrize("case", list(HOSTILE_YAML))
def test_hostile_yaml_is_refused_in_one_line_within_budget(case: str, tmp_path: Path):
    text, expected = HOSTILE_YAML[case]
    config = tmp_path / "pipeline.yaml"
    config.write_text(text)
    before = _snapshot(tmp_path)
    tracemalloc.start()
    try:
        result = CliRunner().invoke(run, [str(config), "--check"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    line = _refused(result)
    assert expected in line, line
    assert peak < MEMORY_BUDGET, f"{peak >> 20} MiB"
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("data, expected", [
    ("run_dir: caf\xe9\n".encode("latin-1"), "is not UTF-8: byte 0xe9 at offset 12"),
    ("run_dir: x\n".encode("utf-16"), "is not UTF-8: byte 0xff at offset 0 (it starts with a UTF-16 byte-order mark)"),
], ids=["latin-1", "utf-16"])
def test_config_in_another_encoding_names_the_file_and_offset(data: bytes, expected: str, tmp_path: Path):
    config = tmp_path / "pipeline.yaml"
    config.write_bytes(data)
    line = _refused(CliRunner().invoke(run, [str(config), "--check"]))
    assert str(config) in line and expected in line, line


@pytest.mark.parametrize("assignment, expected", [
    ("train.epochs=true", "'train.epochs': needs a number"),
    ("generate.interpolation=true", "'generate.interpolation': needs a number"),
    ("train.runs={a: 0, a: 1}", "duplicate key 'a'"),
    ("train.runs={clsp: 1e-320, baseline: 0}", "lambda must be 0 (the baseline)"),
    ("run_dir=[" + ", ".join(["1"] * 1000) + "]", "(got [1, 1, 1, 1, ...])"),
])
def test_set_overrides_are_held_to_the_same_rules(assignment: str, expected: str, tmp_path: Path):
    result = CliRunner().invoke(run, [str(ROOT / "pipeline.yaml"), "--check", "--set", f"run_dir={tmp_path / 'r'}",
                                      "--set", assignment])
    line = _refused(result)
    assert expected in line, line
    assert not (tmp_path / "r").exists()


def test_numbers_where_numbers_belong_still_load(tmp_path: Path):
    """An int for a float field and plain YAML numbers are fine; only bools are refused for numbers."""
    config = tmp_path / "pipeline.yaml"
    config.write_text("generate:\n  interpolation: 1\ntrain:\n  epochs: 3\n  warmup_epochs: 1\n  flip: true\n"
                      "  runs: {clsp: 1.0e-6, baseline: 0}\n")
    loaded = load_config(config)
    assert loaded.generate.interpolation == 1.0 and loaded.train.epochs == 3 and loaded.train.flip is True
    assert loaded.train.runs == {"clsp": 1e-6, "baseline": 0.0}


def test_error_quotes_only_a_prefix_of_a_huge_value():
    bomb: list = [1, 2]
    for _ in range(40):  # 2**41 values if formatted in full
        bomb = [bomb] * 2
    assert len(short(bomb)) <= 80 and len(short("x" * 10**6)) <= 80 and len(short(list(range(10**6)))) <= 80


def test_cli_refuses_true_for_numbers_and_a_tiny_lambda(tmp_path: Path):
    from clsp.train.cli import train

    out = tmp_path / "out"
    for args in (["--epochs", "true"], ["--clsp-lambda", "1e-320"], ["--clsp-lambda", "5e-7"]):
        result = CliRunner().invoke(train, ["--shards", str(tmp_path / "shards"), "--out", str(out), *args])
        line = _refused(result, exit_code=2 if args[0] == "--epochs" else 1)
        assert args[0] in line, line
        assert "1e-320" not in args or "lambda must be 0 (the baseline) or at least 1e-06" in line
    assert not out.exists()


def test_study_refuses_a_lambda_that_rounds_to_nothing(tmp_path: Path):
    from clsp.study import study

    result = CliRunner().invoke(study, [str(ROOT / "pipeline.yaml"), "--seeds", "2", "--methods", "simclr",
                                        "--clsp-lambda", "1e-320", "--set", f"run_dir={tmp_path / 'r'}"])
    assert "lambda must be 0 (the baseline) or at least 1e-06" in _refused(result)
    assert not (tmp_path / "r").exists()


def test_image_size_the_model_cannot_take_is_refused_before_any_image_is_resized(tmp_path: Path, monkeypatch):
    from clsp import datasets
    from clsp.generate.cli import gen

    def no_loading(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the model's fit was checked")

    monkeypatch.setattr(datasets, "load_digits", no_loading)
    shards = tmp_path / "gen" / "shards"
    line = _refused(CliRunner().invoke(gen, ["--dataset", "digits", "--image-size", "1024", "--shards", str(shards)]))
    assert "1024x1024" in line and "--image-size 16" in line, line
    assert not (tmp_path / "gen").exists()  # a refused run leaves no empty output directory


def _encoder(directory: Path, **card_changes) -> Path:
    from clsp.train.backbones import EncoderCard, build_backbone, export_encoder

    net = build_backbone("resnet-narrow", "small")
    card = EncoderCard(backbone="resnet-narrow", stem="small", feature_dim=net.feature_dim, image_size=8,
                       mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    export_encoder(net, directory, card.model_copy(update=card_changes))
    return directory


def _damage_weights(directory: Path, how: str) -> None:
    state = load_file(str(directory / "encoder.safetensors"))
    name = "layer1.0.conv1.weight"
    if how == "nan":
        state[name][0, 0, 0, 0] = float("nan")
    elif how == "inf":
        state[name][0, 0, 0, 0] = float("inf")
    else:
        state[name] = state[name].to(torch.int8)
    save_file(state, str(directory / "encoder.safetensors"))


@pytest.mark.parametrize("damage, expected", [
    ("nan", "layer1.0.conv1.weight holds NaN or infinite values"),
    ("inf", "layer1.0.conv1.weight holds NaN or infinite values"),
    ("int8", "layer1.0.conv1.weight is int8, not floating point"),
    ("std0", "every std must be > 0"), ("std-negative", "every std must be > 0"),
])
@pytest.mark.parametrize("command", ["linear", "knn", "transfer", "positives", "embed-plot"])
def test_meaningless_encoders_are_refused_by_every_evaluation(command: str, damage: str, expected: str,
                                                             tmp_path: Path):
    from clsp.evaluate.cli import evaluate

    std = {"std0": [0.0, 0.25, 0.25], "std-negative": [0.25, -1.0, 0.25]}.get(damage)
    encoder = _encoder(tmp_path / "enc", **({"std": std} if std else {}))
    if std is None:
        _damage_weights(encoder, damage)
    before = _snapshot(tmp_path)
    extra = {"transfer": ["--datasets", "digits"], "positives": ["--shards", str(tmp_path / "shards")]}.get(
        command, ["--dataset", "digits"])
    result = CliRunner().invoke(evaluate, [command, "--encoder", str(encoder), "--out", str(tmp_path / "eval"),
                                           *extra])
    assert expected in _refused(result)
    assert _snapshot(tmp_path) == before and not (tmp_path / "eval").exists()


def test_a_sound_encoder_still_loads(tmp_path: Path):
    from clsp.train.backbones import load_encoder

    net, card = load_encoder(_encoder(tmp_path / "enc"))
    assert card.std == [0.25, 0.25, 0.25] and not net.training


def test_default_workers_fit_the_usable_cores_and_torch_does_not_warn():
    from torch.utils.data import DataLoader

    workers = TrainSettings().workers
    assert 1 <= workers <= min(4, len(os.sched_getaffinity(0)))

    def warned(num_workers: int) -> list[str]:  # the check DataLoader makes when it starts its workers
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            DataLoader(list(range(8)), num_workers=num_workers).check_worker_number_rationality()
        return [str(w.message) for w in caught]

    assert warned(workers) == []
    assert any("worker" in message for message in warned(2 * len(os.sched_getaffinity(0)) + 1))


# ---- one whole run per run directory ----------------------------------------------------------------------
def _locked_run(run_dir: Path, who: str, log: Path, gate, started, lines) -> None:
    """A child process: a pipeline of two cheap stages; stage one waits for ``gate`` (so the other process
    arrives while this one holds the run directory)."""
    config = load_config(ROOT / "pipeline.yaml", (f"run_dir={run_dir}",))
    pipeline = Pipeline(config, echo=lambda line: lines.put((who, line)))

    def stage(name: str) -> None:
        with log.open("a") as f:
            f.write(f"{who} {name}\n")
        if name == "one":
            started.set()
            gate.wait(120)
        (run_dir / f"{name}.out").write_text(who)

    pipeline.stages = {name: Stage(name, config, lambda name=name: stage(name), outputs=[run_dir / f"{name}.out"])
                       for name in ("one", "two")}
    pipeline._report = lambda: run_dir / "report.md"  # the stages write no evaluation results
    pipeline.run()


@pytest.mark.slow
def test_a_second_whole_run_of_one_run_directory_waits_then_skips_what_the_first_did(tmp_path: Path):
    ctx = multiprocessing.get_context("fork")
    gate, started, lines = ctx.Event(), ctx.Event(), ctx.Queue()
    run_dir, log = tmp_path / "run", tmp_path / "log"
    first = ctx.Process(target=_locked_run, args=(run_dir, "first", log, gate, started, lines))
    first.start()
    assert started.wait(120)
    second = ctx.Process(target=_locked_run, args=(run_dir, "second", log, gate, started, lines))
    second.start()
    waiting = f"[clsp run] waiting for process {first.pid}@"
    said: list[tuple[str, str]] = []
    while not any(who == "second" and line.startswith(waiting) for who, line in said):
        said.append(lines.get(timeout=120))
    assert log.read_text() == "first one\n"  # the second process waits: it has run nothing
    gate.set()
    first.join(120)
    second.join(120)
    assert first.exitcode == 0 and second.exitcode == 0
    while not lines.empty():
        said.append(lines.get(timeout=10))
    assert log.read_text() == "first one\nfirst two\n"  # every stage ran once, in the first process
    assert ("second", "[clsp run] one: done already, skipped") in said
    assert ("second", "[clsp run] two: done already, skipped") in said


# --- clsp ddpm convert: the authors' checkpoint and YAML, as an adversary would hand them over -------------------

def _convert_inputs(directory: Path, case: str) -> tuple[Path, Path]:
    """A small valid checkpoint and YAML in the authors' layout, then the one change ``case`` makes."""
    from authors_reference import reference_model, write_artefacts

    state = reference_model().state_dict()
    weight = "encoder.downblocks.0.block1.2.weight"
    tensor_changes = {"nan": lambda t: t.index_fill(0, torch.tensor([0]), float("nan")),
                      "inf": lambda t: t.index_fill(0, torch.tensor([0]), float("inf")),
                      "int64": lambda t: t.to(torch.int64), "bool": lambda t: t > 0,
                      "complex": lambda t: t.to(torch.complex64)}
    if case in tensor_changes:
        state[weight] = tensor_changes[case](state[weight])
    if case == "integer-key":
        state[0] = torch.zeros(1)
    config_changes = {"channel-1e9": {"channel": 1e9}, "channel-2^20": {"channel": 2**20},
                      "channel_mult-1000": {"channel_mult": [1] * 1000}, "res-blocks-10^6": {"num_res_blocks": 10**6},
                      "too-many-parameters": {"channel": 1024, "channel_mult": [16] * 4},
                      "beta_1-over-beta_T": {"beta_1": 0.02, "beta_T": 1e-4},
                      "res-blocks-true": {"num_res_blocks": True}}
    ckpt, config = write_artefacts(directory, state, **config_changes.get(case, {}))
    if case == "text-file":
        ckpt.write_text("T: 1000\nchannel: 128\n")
    fifo = {"fifo-checkpoint": ckpt, "fifo-config": config}.get(case)
    if fifo is not None:
        fifo.unlink()
        os.mkfifo(fifo)
    return ckpt, config


HOSTILE_CONVERT = {
    "fifo-checkpoint": "is a named pipe; pass a regular file",
    "fifo-config": "is a named pipe; pass a regular file",
    "nan": "encoder.downblocks.0.block1.2.weight holds NaN or infinite values",
    "inf": "encoder.downblocks.0.block1.2.weight holds NaN or infinite values",
    "text-file": "cannot read",
    "integer-key": "has a key '0' of type int, not a tensor name",
    "channel-1e9": "channel: Input should be less than or equal to 1024",
    "channel-2^20": "channel: Input should be less than or equal to 1024",
    "channel_mult-1000": "channel_mult: List should have at most 8 items",
    "res-blocks-10^6": "num_res_blocks: Input should be less than or equal to 16",
    "too-many-parameters": "parameters, over the 500,000,000 limit",
    "beta_1-over-beta_T": "beta_1 0.02 must be below beta_T 0.0001",
    "res-blocks-true": "num_res_blocks: needs a number, not true/false",
    "int64": "encoder.downblocks.0.block1.2.weight is int64, not floating point",
    "bool": "encoder.downblocks.0.block1.2.weight is bool, not floating point",
    "complex": "encoder.downblocks.0.block1.2.weight is complex64, not floating point",
}


@pytest.mark.parametrize("case", list(HOSTILE_CONVERT))
def test_hostile_convert_inputs_are_refused_in_one_line_within_budget(case: str, tmp_path: Path):
    import time

    from clsp.generate.ddpm_cli import ddpm

    ckpt, config = _convert_inputs(tmp_path / "in", case)
    before = _snapshot(tmp_path)
    started = time.monotonic()
    tracemalloc.start()
    try:
        result = CliRunner().invoke(ddpm, ["convert", str(ckpt), "--config", str(config), "--out",
                                           str(tmp_path / "out")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    line = _refused(result)
    assert HOSTILE_CONVERT[case] in line, line
    assert time.monotonic() - started < 10 and peak < MEMORY_BUDGET, f"{peak >> 20} MiB"
    assert _snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_unet_folder_with_nan_weights_is_refused_when_loaded(tmp_path: Path):
    from authors_reference import convert_reference
    from clsp.generate.ddpm_cli import ddpm

    _, folder = convert_reference(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(weights))
    line = _refused(CliRunner().invoke(ddpm, ["sample", "--unet", str(folder), "--out", str(tmp_path / "grid.png"),
                                              "--num-samples", "1", "--steps", "1"]))
    assert "holds NaN or infinite values in conv_in.weight" in line, line
    assert not (tmp_path / "grid.png").exists()


# ---- the study's grid: bounded, and its plan said before any work -------------------------------------------------
def test_a_grid_of_a_million_cells_is_refused_at_once(tmp_path: Path):
    from clsp.study import MAX_GRID_CELLS, study

    values = ",".join(str(i) for i in range(1, 1001))
    started = time.monotonic()
    result = CliRunner().invoke(study, [str(ROOT / "pipeline.yaml"), "--methods", "simclr", "--grid",
                                        f"train.epochs={values}", "--grid", f"train.checkpoint_every={values}",
                                        "--set", f"run_dir={tmp_path / 'r'}"])
    line = _refused(result)
    assert f"--grid makes 1,000,000 cells (1000 x 1000); at most {MAX_GRID_CELLS}" in line, line
    assert time.monotonic() - started < 10 and not (tmp_path / "r").exists()


def test_a_study_of_too_many_runs_is_refused_naming_its_plan(tmp_path: Path):
    from clsp.study import MAX_STUDY_RUNS, study

    result = CliRunner().invoke(study, [str(ROOT / "pipeline.yaml"), "--methods", "simclr", "--seeds", "100",
                                        "--grid", "train.lr=0.1,0.2,0.3,0.4", "--grid", "train.epochs=5,6,7,8",
                                        "--set", f"run_dir={tmp_path / 'r'}"])
    line = _refused(result)
    assert line.startswith("Error: the study would train 3400 runs (grid 1 method(s) x 16 cells x 100 seeds x "
                           "2 arms = 3200; test 1 method(s) x 100 seeds x 2 arms = 200)"), line
    assert f"at most {MAX_STUDY_RUNS}" in line and not (tmp_path / "r").exists()


def test_a_study_prints_its_plan_before_any_work(tmp_path: Path, monkeypatch):
    import clsp.study.command

    def no_work(*args, **kwargs):
        raise UserError("stopped before the first phase")

    monkeypatch.setattr(clsp.study.command, "_run_phase", no_work)
    result = CliRunner().invoke(clsp.study.command.study, [
        str(ROOT / "pipeline.yaml"), "--methods", "simclr", "--seeds", "3", "--grid-seeds", "2", "--controls", "self",
        "--grid", "train.clsp_lambda=0.3,1.0", "--grid", "train.lr=0.1,0.2", "--set", f"run_dir={tmp_path / 'r'}"])
    plan = [line for line in result.output.splitlines() if line.startswith("[clsp study] plan:")]
    assert plan == ["[clsp study] plan: grid 1 method(s) x 4 cells x 2 seeds x 2 arms = 16 (12 to train: shared "
                    "baselines); test 1 method(s) x 3 seeds x 3 arms = 9; 21 training runs in all"], result.output
    assert result.output.index(plan[0]) < result.output.index("stopped before the first phase")


# ---- contrastive batches, workers, validation fractions and schedules: refused at --check ------------------------
def test_a_batch_of_one_is_refused_by_clsp_train_and_by_a_study_grid(tmp_path: Path):
    from clsp.study import study
    from clsp.train.cli import train

    expected = "a contrastive batch needs at least 2 samples per process, not 1"
    line = _refused(CliRunner().invoke(train, ["--shards", str(tmp_path / "s"), "--out", str(tmp_path / "o"),
                                               "--batch-size", "1"]))
    assert line == f"Error: --batch-size: {expected}"
    line = _refused(CliRunner().invoke(study, [str(ROOT / "pipeline.yaml"), "--grid", "train.batch_size=1,8",
                                               "--set", f"run_dir={tmp_path / 'r'}"]))
    assert line == f"Error: 'train.batch_size': {expected}"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("assignment, expected", [
    (f"train.workers={len(os.sched_getaffinity(0)) + 1}",
     f"'train.workers': {len(os.sched_getaffinity(0)) + 1} workers exceed the {len(os.sched_getaffinity(0))} usable "
     f"CPU cores; use at most {len(os.sched_getaffinity(0))}"),
    ("validation=1e-9", "'validation': the validation fraction must be 0 (off) or at least 0.01, not 1e-09"),
    ("train.warmup_epochs=50", "warmup_epochs 50 is longer than the run's 15 epochs; use at most 15 (0: none)"),
], ids=["workers", "validation", "warm-up"])
def test_settings_that_only_training_refused_are_refused_at_check(assignment: str, expected: str, tmp_path: Path):
    result = CliRunner().invoke(run, [str(ROOT / "pipeline.yaml"), "--check", "--set", f"run_dir={tmp_path / 'r'}",
                                      "--set", "evaluate.embed_plot=false", "--set", assignment])
    assert expected in _refused(result)
    assert not (tmp_path / "r").exists()


def test_a_study_refuses_a_nan_validation_fraction_without_a_grid(tmp_path: Path):
    from clsp.study import study

    result = CliRunner().invoke(study, [str(ROOT / "pipeline.yaml"), "--methods", "simclr", "--validation", "nan",
                                        "--set", f"run_dir={tmp_path / 'r'}"])
    assert _refused(result) == "Error: --validation: input should be a finite number (got nan)"
    assert not (tmp_path / "r").exists()


def test_a_warmup_longer_than_the_run_is_refused_like_a_long_ramp_and_a_recipe_warmup_is_cut(tmp_path: Path):
    from clsp.train.cli import train
    from clsp.train.config import TrainJob

    line = _refused(CliRunner().invoke(train, ["--shards", str(tmp_path / "s"), "--out", str(tmp_path / "o"),
                                               "--warmup-epochs", "50", "--epochs", "1"]))
    assert line == ("Error: warmup_epochs 50 is longer than the run's 1 epochs; use at most 1 (0: none) or train "
                    "longer")
    assert not (tmp_path / "o").exists()
    recipe_default = TrainJob(shards="s", out="o", epochs=3).resolved("digits")  # SimCLR's recipe: 10 epochs
    assert recipe_default.warmup_epochs == 3 and TrainJob(shards="s", out="o").resolved("digits").warmup_epochs == 10


# ---- long names are quoted short ------------------------------------------------------------------------------------
LONG = "x" * 2000


@pytest.mark.parametrize("command, args", [
    ("run", ["--set", f"dataset.name={LONG}"]),
    ("run", ["--set", f"run_dir=/tmp/{LONG}"]),
    ("gen", ["--dataset", LONG]),
    ("gen", ["--dataset", f"imagefolder:/{LONG}"]),
], ids=["dataset.name", "run_dir", "clsp-gen--dataset", "clsp-gen--dataset-imagefolder"])
def test_a_2000_character_name_is_quoted_in_about_80_characters(command: str, args: list[str], tmp_path: Path):
    from clsp.generate.cli import gen

    if command == "run":
        result = CliRunner().invoke(run, [str(ROOT / "pipeline.yaml"), "--check", *args])
    else:
        result = CliRunner().invoke(gen, [*args, "--shards", str(tmp_path / "s")])
    line = _refused(result)
    assert "x" * 90 not in line and len(line) < 200, line
    assert any(start in line for start in ("unknown dataset 'xxx", "File name too long (/tmp/xxx",
                                           "no diffusion model is known for 'imagefolder:/xxx")), line
    assert list(tmp_path.iterdir()) == []


# ---- the design card's commands, offline ---------------------------------------------------------------------------
def test_clsp_train_without_out_says_out_is_required(tmp_path: Path):
    from clsp.train.cli import train

    line = _refused(CliRunner().invoke(train, ["--shards", str(tmp_path / "s")]), exit_code=2)
    assert line.startswith("Error: --out is required: Run directory"), line


def test_clsp_gen_for_cifar10_offline_is_one_line_without_warnings_or_an_empty_data_folder(tmp_path: Path,
                                                                                          monkeypatch):
    import urllib.error
    import urllib.request

    from clsp.generate.cli import gen

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the card's command as written: the data go to ./data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(gen, ["--dataset", "cifar10", "--data-root", "data", "--shards", "shards"])
    line = _refused(result)
    assert line.startswith("Error: cifar10 (train) is not under data/cifar10 and could not be downloaded"), line
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert list(tmp_path.iterdir()) == []  # no empty data/cifar10/ (nor shards) left


def test_a_hub_model_without_network_fails_fast_in_one_line(tmp_path: Path, monkeypatch):
    from huggingface_hub import constants

    from clsp.cli import main as clsp_main
    from support import free_port

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens: no network
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    started = time.monotonic()
    result = CliRunner().invoke(clsp_main, ["ddpm", "sample", "--unet", "nobody/no-such-model",
                                            "--out", str(tmp_path / "grid.png")])
    line = _refused(result)
    assert time.monotonic() - started < 10, "the hub client retried"
    assert line.startswith("Error: cannot load U-Net 'nobody/no-such-model': it is not a local folder nor in the "
                           "Hugging Face cache, and the hub (127.0.0.1) cannot be reached from here"), line
    assert "config.json" not in line and list(tmp_path.iterdir()) == []


def test_a_named_pipe_as_the_configuration_is_named_as_such(tmp_path: Path):
    fifo = tmp_path / "pipeline.yaml"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    line = _refused(CliRunner().invoke(run, [str(fifo), "--check"]))
    assert line == (f"Error: pipeline configuration {fifo} is not a regular file (a directory, a named pipe or a "
                    f"device); pass a YAML file such as pipeline.yaml")


def test_a_global_batch_of_one_sample_per_process_is_refused_before_training(tmp_path: Path, monkeypatch):
    from accelerate import Accelerator

    from clsp.train.cli import train
    from support import make_train_shards

    shards = make_train_shards(tmp_path / "shards", num_anchors=16, shard_size=16)
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))  # as under a 2-process launch
    result = CliRunner().invoke(train, ["--shards", str(shards), "--out", str(tmp_path / "out"), "--batch-size", "2",
                                        "--workers", "0", "--backbone", "resnet-narrow", "--epochs", "1"])
    assert _refused(result) == ("Error: --batch-size 2 is the global batch and does not split over 2 processes with "
                                "at least 2 samples each; use a multiple of 2, at least 4")
    assert not (tmp_path / "out").exists()
