"""``clsp run pipeline.yaml``: a whole experiment, stage after stage, skipping what is done.

Each stage is the same click command a user would type (``clsp ddpm train``, ``clsp-gen``,
``clsp-train``, ``clsp-eval``), invoked in-process with arguments built from the configuration, so
the pipeline and the commands cannot drift apart. A stage is skipped when ``pipeline_state.json``
records it as finished with the same fingerprint (its own settings plus those of the stages it reads);
an interrupted stage is simply run again and resumes from its own checkpoints or shards.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import click
import yaml

from clsp.errors import Command, UserError
from clsp.io import write_json_atomic

# key -> (accepted types, default, check returning an error text or None)
Spec = tuple[tuple[type, ...], Any, Callable[[Any], str | None] | None]
_NONE = type(None)


def _positive(value) -> str | None:
    return None if value is None or value > 0 else "must be positive"


def _unit(value) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must lie in [0, 1]"


def _non_negative(value) -> str | None:
    return None if value is None or value >= 0 else "must be zero or more"


def _one_of(*choices) -> Callable[[Any], str | None]:
    return lambda value: None if value is None or value in choices else f"must be one of {', '.join(map(str, choices))}"


SCHEMA: dict[str, Any] = {
    "run_dir": ((str,), "runs/digits", None),
    "seed": ((int,), 0, _non_negative),
    "dataset": {
        "name": ((str,), "digits", None),
        "split": ((str, _NONE), None, None),
        "data_root": ((str,), "data", None),
        "image_size": ((int, _NONE), None, _positive),
    },
    "diffusion": {
        "unet": ((str, _NONE), None, None),
        "train": ((bool,), False, None),
        "preset": ((str,), "digits", None),
        "steps": ((int,), 3000, _positive),
        "batch_size": ((int,), 128, _positive),
    },
    "generate": {
        "candidates": ((int,), 8, _positive),
        "weight": ((int, float), 0.1, _unit),
        "steps": ((int,), 100, _positive),
        "eta": ((int, float), 0.1, _non_negative),
        "batch_size": ((int,), 64, _positive),
        "shard_size": ((int,), 1000, _positive),
        "precision": ((str,), "auto", _one_of("auto", "bf16", "fp32")),
        "share_anchor_pass": ((bool,), False, None),
        "limit": ((int, _NONE), None, _positive),
    },
    "train": {
        "method": ((str,), "nnclr", _one_of("simclr", "moco", "nnclr")),
        "backbone": ((str,), "resnet18", None),
        "epochs": ((int,), 1000, _positive),
        "batch_size": ((int, _NONE), None, _positive),
        "lr": ((int, float, _NONE), None, _positive),
        "optimizer": ((str, _NONE), None, _one_of("sgd", "lars")),
        "warmup_epochs": ((int, _NONE), None, _non_negative),
        "precision": ((str,), "auto", _one_of("auto", "bf16", "fp32")),
        "workers": ((int,), 0, _non_negative),
        "augment": ((str,), "cpu", _one_of("cpu", "device")),
        "crop_min_scale": ((int, float), 0.08, lambda v: None if 0 < v <= 1 else "must lie in (0, 1]"),
        "flip": ((bool,), True, None),
        "runs": ((dict,), {"clsp": None, "baseline": 0.0}, None),
    },
    "evaluate": {
        "linear": ((bool,), True, None),
        "linear_epochs": ((int,), 100, _positive),
        "knn": ((bool,), True, None),
        "positives": ((bool,), True, None),
        "embed_plot": ((bool,), False, None),
        "transfer": ((list,), [], None),
    },
}


def _validate(config: dict, schema: dict, prefix: str = "") -> dict:
    """Fill defaults and check every key against the schema; one line naming the key on error."""
    unknown = set(config) - set(schema)
    if unknown:
        key = sorted(unknown)[0]
        close = difflib.get_close_matches(key, list(schema), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(schema)}"
        raise UserError(f"unknown key '{prefix}{key}' in the pipeline configuration{hint}")
    resolved = {}
    for key, spec in schema.items():
        value = config.get(key)
        if isinstance(spec, dict):
            if value is not None and not isinstance(value, dict):
                raise UserError(f"'{prefix}{key}' must be a mapping of settings, not {value!r}")
            resolved[key] = _validate(value or {}, spec, f"{prefix}{key}.")
            continue
        types, default, check = spec
        if key not in config:
            value = default
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join("null" if t is _NONE else t.__name__ for t in types)
            raise UserError(f"'{prefix}{key}' must be {names}, not {value!r}")
        problem = check(value) if check else None
        if problem:
            raise UserError(f"'{prefix}{key}' {problem} (got {value!r})")
        resolved[key] = value
    return resolved


def _validate_runs(runs: dict) -> None:
    if not runs:
        raise UserError("'train.runs' needs at least one run, e.g. {clsp: null, baseline: 0.0}")
    for name, weight in runs.items():
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise UserError(f"'train.runs' run name {name!r} must be letters, digits, '-' or '_'")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0):
            raise UserError(f"'train.runs.{name}' is the CLSP weight: null (method default) or a number >= 0")


def _apply_override(config: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r} must look like key.sub=value, e.g. --set train.epochs=5")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path, overrides: tuple[str, ...] = ()) -> dict:
    """Read, override and validate a pipeline configuration."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pipeline configuration {path} not found; pass a YAML file such as pipeline.yaml")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a mapping of sections (dataset, generate, train, ...)")
    for assignment in overrides:
        _apply_override(config, assignment)
    resolved = _validate(config, SCHEMA)
    _validate_runs(resolved["train"]["runs"])
    return resolved


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _opt(name: str, value: Any) -> list[str]:
    """A CLI option from a config value (None or False mean: the command's own default)."""
    if value is None or value is False:
        return []
    if value is True:
        return [f"--{name}"]
    return [f"--{name}", str(value)]


class Pipeline:
    """Runs the stages of one configuration, recording which are finished."""

    def __init__(self, config: dict, echo: Callable[[str], None] = click.echo) -> None:
        self.config = config
        self.run_dir = Path(config["run_dir"])
        self.state_file = self.run_dir / "pipeline_state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        self.echo = echo
        self.ran: list[str] = []

    def _stage(self, name: str, fingerprint: str, outputs: list[Path], body: Callable[[], None]) -> str:
        if self.state.get(name) == fingerprint and all(p.exists() for p in outputs):
            self.echo(f"[clsp run] {name}: done already, skipped")
            return fingerprint
        self.echo(f"[clsp run] {name}: running")
        start = time.time()
        body()
        self.state[name] = fingerprint
        write_json_atomic(self.state_file, self.state)
        self.ran.append(name)
        self.echo(f"[clsp run] {name}: finished in {time.time() - start:.0f} s")
        return fingerprint

    @staticmethod
    def _invoke(command: click.Command, args: list[str]) -> None:
        command.main(args=args, prog_name=command.name, standalone_mode=False)

    def _dataset_args(self) -> list[str]:
        ds = self.config["dataset"]
        return ["--dataset", ds["name"], "--data-root", ds["data_root"]] + _opt("image-size", ds["image_size"])

    def run(self) -> Path:
        cfg, seed = self.config, self.config["seed"]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "pipeline.json", cfg)
        unet, fp = self._diffusion()
        shards = self.run_dir / "shards"
        gen = cfg["generate"]
        fp = self._stage("generate", _fingerprint(fp, cfg["dataset"], gen, seed), [shards / "manifest.json"],
                         lambda: self._generate(unet, shards))
        encoders = {}
        for run_name, weight in cfg["train"]["runs"].items():
            out = self.run_dir / "train" / run_name
            encoders[run_name] = out
            self._stage(f"train:{run_name}", _fingerprint(fp, cfg["train"], run_name, weight, seed),
                        [out / "encoder.safetensors"], lambda out=out, weight=weight: self._train(shards, out, weight))
        return self._evaluate(shards, encoders, fp)

    def _diffusion(self) -> tuple[str | None, str]:
        cfg = self.config["diffusion"]
        if not cfg["train"]:
            return cfg["unet"], _fingerprint(cfg["unet"])
        from clsp.generate.ddpm_cli import train as ddpm_train

        out = self.run_dir / "ddpm"
        args = self._dataset_args() + ["--out", str(out), "--preset", cfg["preset"], "--steps", str(cfg["steps"]),
                                       "--batch-size", str(cfg["batch_size"]), "--seed", str(self.config["seed"])]
        fp = self._stage("diffusion", _fingerprint(self.config["dataset"], cfg, self.config["seed"]),
                         [out / "config.json"], lambda: self._invoke(ddpm_train, args))
        return str(out), fp

    def _generate(self, unet: str | None, shards: Path) -> None:
        from clsp.generate.cli import gen

        g = self.config["generate"]
        args = self._dataset_args() + ["--shards", str(shards), "--seed", str(self.config["seed"])] + _opt("unet", unet)
        for key in ("candidates", "weight", "steps", "eta", "batch_size", "shard_size", "precision", "limit",
                    "share_anchor_pass"):
            args += _opt(key.replace("_", "-"), g[key])
        args += _opt("split", self.config["dataset"]["split"])
        self._invoke(gen, args)

    def _train(self, shards: Path, out: Path, weight: float | None) -> None:
        from clsp.train.cli import train

        t = self.config["train"]
        args = ["--shards", str(shards), "--out", str(out), "--data-root", self.config["dataset"]["data_root"],
                "--seed", str(self.config["seed"])] + _opt("clsp-weight", weight)
        for key in ("method", "backbone", "epochs", "batch_size", "lr", "optimizer", "warmup_epochs", "precision",
                    "workers", "augment", "crop_min_scale"):
            args += _opt(key.replace("_", "-"), t[key])
        args.append("--flip" if t["flip"] else "--no-flip")
        if self.config["generate"]["limit"]:
            args.append("--allow-partial")
        self._invoke(train, args)

    def _evaluate(self, shards: Path, encoders: dict[str, Path], upstream: str) -> Path:
        from clsp.evaluate import cli as eval_cli
        from clsp.evaluate.features import file_hash
        from clsp.evaluate.report import write_report

        e, ds = self.config["evaluate"], self.config["dataset"]
        data = ["--dataset", ds["name"], "--data-root", ds["data_root"]]
        eval_dirs = {}
        for run_name, encoder in encoders.items():
            out = self.run_dir / "eval" / run_name
            eval_dirs[run_name] = out
            common = ["--encoder", str(encoder), "--out", str(out)]
            steps: list[tuple[str, list[str]]] = []
            if e["linear"]:
                steps.append(("linear", common + data + ["--epochs", str(e["linear_epochs"])]))
            if e["knn"]:
                steps.append(("knn", common + data))
            if e["positives"]:
                steps.append(("positives", common + ["--shards", str(shards), "--data-root", ds["data_root"]]))
            if e["embed_plot"]:
                steps.append(("embed-plot", common + data + ["--png", str(out / "tsne.png")]))
            if e["transfer"]:
                steps.append(("transfer", common + ["--datasets", ",".join(e["transfer"]), "--data-root", ds["data_root"]]))
            weights_fp = file_hash(encoder / "encoder.safetensors", encoder / "encoder.json")
            for command, args in steps:
                self._stage(f"eval:{run_name}:{command}", _fingerprint(upstream, e, weights_fp, command),
                            [out / "results.json"],
                            lambda command=command, args=args: self._invoke(eval_cli.evaluate.get_command(None, command), args))
        report = self.run_dir / "report.md"
        write_report(eval_dirs, report, dataset=ds["name"])
        return report


@click.command(cls=Command, context_settings={"show_default": True})
@click.argument("config", type=click.Path(dir_okay=False), default="pipeline.yaml")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a configuration key, e.g. --set train.epochs=5 (repeatable).")
@click.option("--check", is_flag=True, help="Only validate the configuration and print it resolved.")
def run(config: str, overrides: tuple[str, ...], check: bool) -> None:
    """Run the experiment described by CONFIG: generate -> train -> evaluate -> report.md."""
    resolved = load_config(config, overrides)
    if check:
        click.echo(yaml.safe_dump(resolved, sort_keys=False))
        return
    pipeline = Pipeline(resolved)
    report = pipeline.run()
    done = ", ".join(pipeline.ran) if pipeline.ran else "nothing (everything was done already)"
    click.echo(f"[clsp run] ran: {done}")
    click.echo(f"[clsp run] report: {report}")
