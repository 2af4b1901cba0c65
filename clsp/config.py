"""Typed settings: every setting is declared once, and the commands and ``pipeline.yaml`` derive from it.

A stage's settings are a pydantic model (type, default, allowed range and help text per field; NaN and
infinity refused everywhere). ``click_options`` turns a model into the click options of a command, so a
command-line default cannot differ from the model's, and ``parse`` validates values into the model with
one error line naming the option or the YAML key.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import click
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from clsp.datasets import DEFAULT_DATA_ROOT, IMAGEFOLDER, dataset_info, dataset_names
from clsp.errors import UserError, short

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
PRECISION_HELP = "auto: bf16 autocast on GPUs and on CPUs with bf16 units, else fp32."
DATASET_HELP = f"Dataset registry name ({', '.join(dataset_names())})."
TF32 = Literal["conv", "all", "none"]  # where fp32 work may run as TF32 on NVIDIA GPUs (clsp.runtime.apply_tf32)
# What a setting is for. result: it shapes what a run produces (weights, shards, scores), so it is part of
# a stage's fingerprint, of what a resumed run must match and of the records a result carries; location:
# where a run reads and writes; logging: what it reports and how often it checkpoints; speed: how fast it
# runs, with the same result. A setting that changes numerics (precision, the order of batches) is result.
Role = Literal["result", "location", "logging", "speed"]
ROLES: tuple[str, ...] = get_args(Role)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024  # the sizes --image-size resizes to
MIN_VALIDATION = 0.01  # the smallest validation fraction: 1 % of a label (1 of the 139 of digits' rarest)


class Settings(BaseModel):
    """Base of every settings model: unknown keys and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads ``true`` as 1 for a number; a number field takes numbers only."""
        if info.field_name is not None and _bool_for_number(cls.model_fields[info.field_name].annotation, value):
            raise ValueError("needs a number, not true/false")
        return value

    def replace(self: M, **changes: Any) -> M:
        """A validated copy with ``changes`` applied (``model_copy`` would skip validation)."""
        return type(self).model_validate({**self.model_dump(), **changes})


def _bool_for_number(annotation: Any, value: Any) -> bool:
    """Whether ``value`` is, or holds, a bool where ``annotation`` wants a number (int or float, not bool)."""
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    if isinstance(value, bool):
        return bool({int, float} & set(options)) and bool not in options
    for option in options:
        origin, args = get_origin(option), get_args(option)
        if origin is dict and isinstance(value, dict) and len(args) == 2:
            return any(_bool_for_number(args[1], item) for item in value.values())
        if origin in (tuple, list) and isinstance(value, (list, tuple)) and args:
            return any(_bool_for_number(args[0], item) for item in value)
    return False


def setting(default: Any = ..., help: str = "", *, role: Role = "result", cli: str | None = None,
            cli_exclude: bool = False, clsp_only: bool = False, **constraints: Any) -> Any:
    """A field with its help text and its ``role`` (``ROLES``: whether it shapes the result, or only says
    where a run reads and writes, what it logs, or how fast it runs); ``clsp_only``: a result setting that a
    baseline (lambda 0) never reads, so runs differing only in such settings share one baseline (``clsp
    study``); ``cli`` renames its option (``--dataset`` for ``name``), ``cli_exclude`` keeps it out of the
    command line (pipeline-only settings);
    a ``default_factory`` among the constraints takes the place of ``default`` (a default found on the machine)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    extra = {key: value for key, value in (("cli", cli), ("cli_exclude", cli_exclude), ("clsp_only", clsp_only))
             if value}
    if "default_factory" not in constraints:
        constraints["default"] = default
    return Field(description=help, json_schema_extra={"role": role, **extra}, **constraints)


def same_setting(model: type[BaseModel], name: str) -> Any:
    """The setting ``name`` exactly as ``model`` declares it (default, help, role, constraints), for another
    model that takes it too: declared once. ``Any``, like ``setting``, so that it stands as a field's default."""
    return model.model_fields[name]


def required(value: T | None, name: str) -> T:
    """A setting that a job's resolution (``TrainJob.resolved``, ``resolve_ddpm``) fills from the recipe or
    preset when left unset: never None afterwards, which its type cannot say; ValueError on an unresolved job."""
    if value is None:
        raise ValueError(f"the setting {name} is unset: resolve the job's recipe or preset defaults before using it")
    return value


def _extra(model: type[BaseModel], name: str) -> dict[str, Any]:
    """What ``setting`` recorded about a field beside pydantic's own (its role, its option's spelling)."""
    extra = model.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def role_of(model: type[BaseModel], name: str) -> str:
    """The role a field was declared with (``result`` for a field not declared with ``setting``)."""
    return str(_extra(model, name).get("role", "result"))


def fields_with_role(model: type[BaseModel] | BaseModel, *roles: str) -> set[str]:
    """The fields of ``model`` declared with one of ``roles``."""
    cls = model if isinstance(model, type) else type(model)
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; roles are {', '.join(ROLES)}")
    return {name for name in cls.model_fields if role_of(cls, name) in roles}


def clsp_only_fields(model: type[BaseModel]) -> set[str]:
    """The fields of ``model`` a baseline run never reads (declared ``clsp_only``)."""
    return {name for name in model.model_fields if _extra(model, name).get("clsp_only")}


def identity(job: BaseModel) -> dict[str, Any]:
    """The settings of ``job`` that shape its result: what a stage's fingerprint hashes, what a resumed run
    must match and what a result records about how it was made."""
    return job.model_dump(include=fields_with_role(job, "result"))


def _unwrap_optional(annotation: Any) -> tuple[bool, Any]:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return True, args[0]
    return False, annotation


def option_name(model: type[BaseModel], field: str) -> str:
    """The command-line spelling of a field (``--batch-size``)."""
    return str(_extra(model, field).get("cli") or "--" + field.replace("_", "-"))


def cli_fields(model: type[BaseModel], exclude: tuple[str, ...] = ()) -> list[str]:
    """The fields of ``model`` that appear as command-line options."""
    return [name for name in model.model_fields if name not in exclude and not _extra(model, name).get("cli_exclude")]


def _option(model: type[BaseModel], name: str) -> Callable:
    info = model.model_fields[name]
    flag = option_name(model, name)
    _, base = _unwrap_optional(info.annotation)
    required = info.is_required()
    default = None if required else info.get_default(call_default_factory=True)
    kwargs: dict[str, Any] = {"help": info.description or "", "show_default": default is not None}
    if not required:  # click (8.2+) skips its "Missing option" check for an option given an explicit default
        kwargs["default"] = default
    if base is bool:
        return click.option(f"{flag}/{flag.replace('--', '--no-', 1)}", name, **kwargs)
    if get_origin(base) is tuple:  # a repeatable option
        return click.option(flag, name, type=get_args(base)[0], multiple=True, required=required, **kwargs)
    if get_origin(base) is Literal:
        ctype: Any = click.Choice([str(choice) for choice in get_args(base)])
    elif base in (int, float, str):
        ctype = base
    else:
        raise TypeError(f"{model.__name__}.{name}: no command-line form for {info.annotation}; mark it cli_exclude")
    return click.option(flag, name, type=ctype, required=required, **kwargs)


def click_options(model: type[BaseModel], exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator adding one click option per field of ``model`` (in declaration order)."""

    def decorate(func: Callable) -> Callable:
        for name in reversed(cli_fields(model, exclude)):
            func = _option(model, name)(func)
        return func

    return decorate


def pick(model: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that are fields of ``model``."""
    return {key: value for key, value in values.items() if key in model.model_fields}


def _field_at(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, str | None]:
    """The model owning the last field of a validation location, and that field's name."""
    owner: Any = model
    for part in loc[:-1]:
        info = owner.model_fields.get(part) if isinstance(owner, type) and issubclass(owner, BaseModel) else None
        if info is None:
            return None, str(loc[-1])
        _, owner = _unwrap_optional(info.annotation)
    is_model = isinstance(owner, type) and issubclass(owner, BaseModel)
    return (owner if is_model else None), (str(loc[-1]) if loc else None)


_TYPE_NAMES = {"float", "int", "str", "bool", "none", "literal"}


def _key(part: Any) -> str:
    """A key of a validation location as quoted in a message (an unknown key may be any length)."""
    text = str(part)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(error: ValidationError, model: type[BaseModel], where: str) -> str:
    first = error.errors()[0]
    # a union's branch appears in the location as its type ("float", "dict[str,any]"): not a key
    loc = tuple(part for part in first["loc"] if not (isinstance(part, str) and
                                                      (part in _TYPE_NAMES or "[" in part)))
    owner, name = _field_at(model, loc)
    section = (where,) if where not in ("cli", "") else ()
    dotted = ".".join(_key(part) for part in section + loc)
    if where == "cli" and owner is not None and name in owner.model_fields:
        label = option_name(owner, name)
    else:
        label = f"'{dotted}'" if dotted else ""
    if first["type"] == "extra_forbidden":
        known = list(owner.model_fields) if owner is not None else []
        close = difflib.get_close_matches(name, known, n=1) if name is not None else []
        parent = ".".join(_key(part) for part in section + loc[:-1])
        hint = f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else \
            (f"; known keys: {', '.join(known)}" if known else "")
        return f"unknown key {label}{hint}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] != "value_error":
        message = message[0].lower() + message[1:]
    shown = "" if first["type"] in ("missing", "value_error") else f" (got {short(first.get('input'))})"
    return f"{label}: {message}{shown}" if label else f"{message}{shown}"


def parse(model: type[M], values: dict[str, Any], where: str = "cli") -> M:
    """Validate ``values`` into ``model``; a bad value is one ``UserError`` line naming the option
    (``where="cli"``) or the dotted key under the section ``where`` ("" for the top level)."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise UserError(_describe(error, model, where)) from None


class DatasetConfig(Settings):
    """Which real images a stage uses (the ``dataset`` section of pipeline.yaml)."""

    name: str = setting("digits", DATASET_HELP,
                        cli="--dataset", min_length=1, max_length=4096)
    split: str | None = setting(None, "Dataset split [default: the dataset's training split].", max_length=64)
    data_root: str = setting(DEFAULT_DATA_ROOT, "Where datasets are stored or downloaded (env CLSP_DATA_ROOT).",
                             role="location", min_length=1, max_length=4096)
    image_size: int | None = setting(None, "Resize the images to this size [default: the dataset's].",
                                     ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        if name == IMAGEFOLDER:
            raise ValueError("imagefolder: needs a folder, as imagefolder:PATH")
        dataset_info(name)  # refuses unknown names in one line listing the known ones
        return name

    @field_validator("split")
    @classmethod
    def _known_split(cls, split: str | None, info: ValidationInfo) -> str | None:
        known = dataset_info(info.data["name"]) if "name" in info.data else None
        if known is not None and split is not None and split not in known.splits:
            raise ValueError(f"{info.data['name']} has splits {', '.join(known.splits)}, not {split!r}")
        return split


def _holds_images(value: float) -> float:
    """A fraction that rounds to no image of a label would only be refused once training reads the data."""
    if 0 < value < MIN_VALIDATION:
        raise ValueError(f"the validation fraction must be 0 (off) or at least {MIN_VALIDATION:g}, not {value:g}")
    return value


class NumericsSettings(Settings):
    """What fp32 means on a GPU, declared once for every stage that computes in it."""

    tf32: TF32 = setting(
        "conv", "Where fp32 work runs as TF32 on NVIDIA GPUs: conv = convolutions only, matrix products in full fp32 "
                "(PyTorch's defaults, under which the authors' fp32 ran); all = both (faster); none = full fp32 "
                "everywhere (slowest). No effect on CPUs or on bf16 autocast's bf16 operations.")


class ValidationSettings(Settings):
    """A validation split carved from the training split, so settings are chosen without the test split."""

    # the rule is part of the field, so every model that takes it with ``same_setting`` applies it too
    validation: Annotated[float, AfterValidator(_holds_images)] = setting(
        0.0, "Hold out this fraction of each label of the training split as validation data (fixed by the data's "
             "fingerprint): training skips those anchors, evaluations fit on the rest and score on them, and the "
             f"test split is not read. 0: off; else {MIN_VALIDATION:g} to 0.5.", ge=0, le=0.5)
