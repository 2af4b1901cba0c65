"""``clsp run pipeline.yaml``: a whole experiment, stage after stage, skipping what is done.

The YAML file is one ``PipelineConfig``: a section per stage, each the same settings model its command
derives its options from. ``clsp run`` builds every stage's job from it and validates all of them (and
that the diffusion model fits the data) before any work, then calls the stage functions with the jobs.

A stage is skipped when ``RUN_DIR/pipeline_state.json`` records it finished with the same fingerprint: a
hash of its own resolved job and of the fingerprints of the stages it reads. So changing one evaluation
reruns only it, and adding a run trains only that run. ``--only STAGE`` runs one stage (cluster jobs do,
under ``accelerate launch`` or a Slurm array) and records it the same way, so a later ``clsp run`` skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from pydantic import ValidationError, model_validator

from clsp.config import DatasetConfig, Settings, ValidationSettings, identity, parse, same_setting, setting
from clsp.errors import SETTINGS, Command, UserError, short
from clsp.evaluate.config import EvaluateSettings
from clsp.generate.config import DDPMJob, DDPMSettings, GenerateJob, GenerateSettings
from clsp.io import check_creatable, exclusive_lock, owned_lock, write_json_atomic
from clsp.shards.reader import MANIFEST
from clsp.shards.store import ShardStore, exists
from clsp.train.config import TrainJob, TrainSettings
from clsp.yamlio import parse_yaml, read_yaml

J = TypeVar("J", bound=Settings)
STATE_FILE = "pipeline_state.json"
RUN_LOCK = ".run.lock"
_RUN_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class DiffusionSection(DDPMSettings):
    """The diffusion model: a given one (``unet``), the dataset's known one, or one trained first."""

    unet: str | None = setting(None, "Model folder or hub id; null: the dataset's known model.")
    train: bool = setting(False, "Train a DDPM on the real training split first (datasets without a model).")


class TrainSection(TrainSettings):
    """The training settings shared by every run, and the runs: name -> lambda of the CLSP term (null: the
    recipe's; 0: the baseline), or name -> a mapping of settings that differ for that run (e.g. its method)."""

    runs: dict[str, float | None | dict[str, Any]] = setting(
        {"clsp": None, "baseline": 0.0}, "Run name: lambda (null: the recipe's; 0: baseline) or a mapping of the "
                                         "run's own settings.")

    @model_validator(mode="after")
    def _runs(self) -> TrainSection:
        if not self.runs:
            raise ValueError("'runs' needs at least one run, e.g. {clsp: null, baseline: 0.0}")
        for name in self.runs:
            if not _RUN_NAME.match(name):
                raise ValueError(f"run name {short(name)} must be 1-64 letters, digits, '-' or '_'")
            self.run_settings(name)  # each run's settings are valid on their own
            seed = self.run_seed(name)
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
                raise ValueError(f"run {name!r}: seed must be an integer >= 0, got {short(seed)}")
        return self

    def run_seed(self, name: str) -> int | None:
        """A run's own seed (a study's repeated runs), or None for the pipeline's."""
        own = self.runs[name]
        return own.get("seed") if isinstance(own, dict) else None

    def run_settings(self, name: str) -> dict[str, Any]:
        """The settings of run ``name``: the shared ones with the run's own applied, validated."""
        own = self.runs[name]
        if not isinstance(own, dict):
            own = {} if own is None else {"clsp_lambda": own}
        own = {key: value for key, value in own.items() if key != "seed"}
        try:
            return TrainSettings.model_validate({**self.model_dump(exclude={"runs"}), **own}).model_dump()
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(map(str, first["loc"]))
            message = first["msg"].removeprefix("Value error, ")
            shown = "" if first["type"] == "value_error" else f" (got {short(first.get('input'))})"
            raise ValueError(f"run {short(name)}: {where}: {message[0].lower()}{message[1:]}{shown}") from None


class PipelineConfig(Settings):
    """A whole experiment (pipeline.yaml)."""

    run_dir: str = setting("runs/digits", "Where every stage writes.", role="location", min_length=1)
    shards: str | None = setting(None, "Where the shards go: a directory or a URL (s3://bucket/prefix, gs://..., "
                                       "read-only http(s)://). [default: RUN_DIR/shards]", role="location",
                                 min_length=1)
    seed: int = setting(0, "Seed of every stage.", ge=0, le=2**63 - 1)
    validation: float = same_setting(ValidationSettings, "validation")
    dataset: DatasetConfig = DatasetConfig()
    diffusion: DiffusionSection = DiffusionSection()
    generate: GenerateSettings = GenerateSettings()
    train: TrainSection = TrainSection()
    evaluate: EvaluateSettings = EvaluateSettings()

    @model_validator(mode="after")
    def _validation_only(self) -> PipelineConfig:
        if self.validation and (self.evaluate.embed_plot or self.evaluate.transfer):
            raise ValueError("with validation > 0 every score comes from the validation images; turn off "
                             "evaluate.embed_plot and evaluate.transfer, which read test splits")
        return self


def _apply_override(config: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise UserError(f"--set {short(assignment)} must look like key.sub=value, e.g. --set train.epochs=5")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted[:60]}: '{key[:60]}' is not a section")
    node[keys[-1]] = parse_yaml(raw, f"--set {dotted[:60]}")


def load_config(path: str | Path, overrides: tuple[str, ...] = ()) -> PipelineConfig:
    """Read (within the budgets of ``clsp.yamlio``), override and validate a pipeline configuration."""
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file (a directory, a named pipe or a device)" if path.exists() else "not found"
        raise UserError(f"pipeline configuration {path} {what}; pass a YAML file such as pipeline.yaml")
    config = read_yaml(path) or {}
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a mapping of sections (dataset, generate, train, ...)")
    for assignment in overrides:
        _apply_override(config, assignment)
    return parse(PipelineConfig, config, where="")


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    """One unit of work: its job (a validated settings model, resolved), what it reads, and how to run it."""

    name: str
    job: Settings
    run: Callable[[], Any]
    upstream: list[str] = field(default_factory=list)
    outputs: list[str | Path] = field(default_factory=list)  # local paths or URLs (the shards may be remote)

    @property
    def identity(self) -> dict[str, Any]:
        """The job's settings that shape the result (declared with role "result")."""
        return identity(self.job)


class Pipeline:
    """The stages of one configuration, in order, with the bookkeeping of which are finished."""

    def __init__(self, config: PipelineConfig, echo: Callable[[str], None] = click.echo) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.shards = config.shards or str(self.run_dir / "shards")
        self.state_file = self.run_dir / STATE_FILE
        self.echo = echo
        self.ran: list[str] = []
        self.stages: dict[str, Stage] = {}
        self._build()

    # ---- the stages -------------------------------------------------------------------------------------
    def _add(self, stage: Stage) -> None:
        self.stages[stage.name] = stage

    def _build(self) -> None:
        cfg, seed = self.config, self.config.seed
        dataset = cfg.dataset.model_dump()
        unet = cfg.diffusion.unet
        upstream: list[str] = []
        if cfg.diffusion.train:
            from clsp.generate.ddpm_training import resolve_ddpm, train_ddpm

            out = self.run_dir / "ddpm"
            ddpm = resolve_ddpm(parse(DDPMJob, {**dataset, **cfg.diffusion.model_dump(exclude={"unet", "train"}),
                                                "out": str(out), "seed": seed}, where="diffusion"))
            self._add(Stage("diffusion", ddpm, lambda: train_ddpm(ddpm, start_over=True),
                            outputs=[out / "model_index.json"]))
            unet, upstream = str(out), ["diffusion"]
        shards = self.shards
        # The run directory belongs to this configuration: changed settings retrain a model or run there (a
        # checkpoint of other settings is passed over, start_over) and regenerate its shards (the same
        # settings resume, whatever overwrite says, so concurrent array tasks never wipe each other). Shards
        # at a location the configuration names may be shared, so other settings there are refused.
        gen = parse(GenerateJob, {**dataset, **cfg.generate.model_dump(), "shards": shards, "unet": unet,
                                  "seed": seed, "overwrite": cfg.shards is None}, where="generate")
        from clsp.generate.job import run_generation

        self._add(Stage("generate", gen, lambda: run_generation(gen, echo=self.echo), upstream=upstream,
                        outputs=[ShardStore.open(shards).where(MANIFEST)]))
        from clsp.train.trainer import train as run_training

        for run_name in cfg.train.runs:
            out = self.run_dir / "train" / run_name
            run_seed = cfg.train.run_seed(run_name)
            job = parse(TrainJob, {**cfg.train.run_settings(run_name), "shards": shards, "out": str(out),
                                   "data_root": cfg.dataset.data_root, "seed": seed if run_seed is None else run_seed,
                                   "allow_partial": cfg.generate.limit is not None, "validation": cfg.validation},
                        where="train")
            # resolved here (and again, to the same, by the trainer): the fingerprint holds the recipe's values
            resolved = job.resolved(cfg.dataset.name)
            self._add(Stage(f"train:{run_name}", resolved, partial(run_training, resolved, start_over=True),
                            upstream=["generate"], outputs=[out / "encoder.safetensors", out / "encoder.json"]))
            self._add_evaluations(run_name, out)

    def _add_evaluations(self, run_name: str, encoder: Path) -> None:
        from clsp.evaluate.cli import EVALUATIONS

        ds = self.config.dataset
        out = self.run_dir / "eval" / run_name
        common = {"encoder": str(encoder), "out": str(out), "data_root": ds.data_root, "seed": self.config.seed}
        wanted = self.config.evaluate.jobs(dataset=ds.name, validation=self.config.validation, shards=self.shards,
                                           out=str(out))
        for command, values in wanted.items():
            model, run = EVALUATIONS[command]
            job = parse(model, {**common, **values}, where="evaluate")
            self._add(Stage(f"eval:{run_name}:{command}", job, partial(run, job),
                            upstream=[f"train:{run_name}"], outputs=[out / "results.json"]))

    def _job(self, name: str, model: type[J]) -> J:
        """The job of stage ``name``, which ``_build`` made a ``model``."""
        job = self.stages[name].job
        if not isinstance(job, model):
            raise TypeError(f"stage {name} holds a {type(job).__name__}, not a {model.__name__}")
        return job

    # ---- checks and bookkeeping ---------------------------------------------------------------------------
    def selected(self, only: str | None) -> list[str]:
        """The stages a run covers: all, or the one named by ``--only``."""
        if only is not None and only not in self.stages:
            raise UserError(f"--only {only!r} is not a stage of this configuration; stages: "
                            f"{', '.join(self.stages)}")
        return [only] if only else list(self.stages)

    def check(self, only: str | None = None) -> list[str]:
        """Every check a stage would make before work; returns notes on what could not be checked here."""
        from clsp.datasets import dataset_info
        from clsp.generate.job import check_model_fits

        cfg, notes = self.config, []
        self.selected(only)
        check_creatable(self.run_dir)
        self._state()  # a damaged state file is refused before anything is written
        for stage in self.stages.values():
            if isinstance(stage.job, TrainJob):
                stage.job.resolved(cfg.dataset.name)
        gen = self._job("generate", GenerateJob)
        info = dataset_info(cfg.dataset.name)
        size = cfg.dataset.image_size or (info.image_size if info is not None else None)
        if cfg.diffusion.train:
            from clsp.generate.ddpm_presets import check_image_size, get_preset

            if size is not None:
                check_image_size(get_preset(self._job("diffusion", DDPMJob).preset), size)
        else:
            notes += check_model_fits(gen.unet, cfg.dataset.name, cfg.dataset.image_size, gen.guidance)
        return notes

    def _state(self) -> dict[str, str]:
        if not self.state_file.is_file():
            return {}
        try:
            state = json.loads(self.state_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{self.state_file} is damaged; delete it (finished stages then rerun, resuming from "
                            "their outputs)") from None
        if not isinstance(state, dict) or not all(isinstance(v, str) for v in state.values()):
            raise UserError(f"{self.state_file} is not a stage -> fingerprint mapping; delete it")
        return state

    def _record(self, name: str, value: str) -> None:
        """Record a finished stage under a lock: several cluster jobs may finish at once."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.run_dir / ".pipeline_state.lock"):
            state = self._state()
            state[name] = value
            write_json_atomic(self.state_file, state)

    def fingerprints(self) -> dict[str, str]:
        """Each stage's fingerprint: its identity plus its upstream stages' fingerprints."""
        prints: dict[str, str] = {}
        for name, stage in self.stages.items():
            prints[name] = fingerprint(name, stage.identity, [prints[up] for up in stage.upstream])
        return prints

    def done(self, name: str, prints: dict[str, str], state: dict[str, str]) -> bool:
        stage = self.stages[name]
        return state.get(name) == prints[name] and all(exists(path) for path in stage.outputs)

    def run(self, only: str | None = None) -> Path | None:
        """Run what is not done (or only the stage ``only``); returns the report path after a full run.

        A whole run holds the run directory's lock, so a second ``clsp run`` or ``clsp study`` of it waits and
        then skips what the first finished. ``--only`` stages take no lock: array tasks and the ranks of one
        launch run the same stage at once by design (and record it under the state file's lock)."""
        if only is not None or not _main_process():
            return self._run(only)
        with owned_lock(self.run_dir / RUN_LOCK, lambda line: self.echo(f"[clsp run] {line}")):
            return self._run(only)

    def _run(self, only: str | None) -> Path | None:
        prints, state = self.fingerprints(), self._state()
        for name in self.selected(only):
            stage = self.stages[name]
            missing = [up for up in stage.upstream if not self.done(up, prints, state)]
            if missing:
                raise UserError(f"stage {name} needs {', '.join(missing)} finished first; run them (clsp run "
                                f"CONFIG --only {missing[0]}) or run the whole pipeline")
            if self.done(name, prints, state):
                self.echo(f"[clsp run] {name}: done already, skipped")
                continue
            self.echo(f"[clsp run] {name}: running")
            start = time.time()
            stage.run()
            if name == "generate" and not self._generation_complete():
                self.echo(f"[clsp run] {name}: this worker's shards are written; others are still missing")
                continue
            if _main_process():
                self._record(name, prints[name])
            state[name] = prints[name]
            self.ran.append(name)
            self.echo(f"[clsp run] {name}: finished in {time.time() - start:.0f} s")
        if only is not None or not _main_process():
            return None
        return self._report()

    def _generation_complete(self) -> bool:
        from clsp.shards.reader import ShardDirectory

        store = ShardDirectory.open(self._job("generate", GenerateJob).shards)
        return len(store.verified_shards()) == store.num_shards

    def _report(self) -> Path:
        from clsp.evaluate.report import write_report

        eval_dirs = {name: self.run_dir / "eval" / name for name in self.config.train.runs}
        report = self.run_dir / "report.md"
        write_report(eval_dirs, report, dataset=self.config.dataset.name)
        return report


def _main_process() -> bool:
    """Rank 0 of an ``accelerate launch`` group (or a plain process): the one that records state."""
    return int(os.environ.get("RANK", "0")) == 0


@click.command(cls=Command, context_settings=SETTINGS)
@click.argument("config", type=click.Path(dir_okay=False), default="pipeline.yaml")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a configuration key, e.g. --set train.epochs=5 (repeatable).")
@click.option("--check", is_flag=True, help="Validate everything a stage would check, print the resolved "
                                            "configuration and the stages, and do no work.")
@click.option("--only", default=None, metavar="STAGE",
              help="Run only this stage (generate, train:NAME, eval:NAME:COMMAND, diffusion), e.g. in a "
                   "cluster job; a later clsp run skips it.")
def run(config: str, overrides: tuple[str, ...], check: bool, only: str | None) -> None:
    """Run the experiment described by CONFIG: generate -> train -> evaluate -> report.md."""
    resolved = load_config(config, overrides)
    pipeline = Pipeline(resolved)
    notes = pipeline.check(only)
    if check:
        click.echo(yaml.safe_dump(resolved.model_dump(), sort_keys=False))
        click.echo("stages: " + ", ".join(pipeline.stages))
        for note in notes:
            click.echo(f"note: {note}")
        return
    if _main_process():
        write_json_atomic(pipeline.run_dir / "pipeline.json", resolved.model_dump())
    report = pipeline.run(only)
    done = ", ".join(pipeline.ran) if pipeline.ran else "nothing (everything was done already)"
    click.echo(f"[clsp run] ran: {done}")
    if report is not None:
        click.echo(f"[clsp run] report: {report}")
