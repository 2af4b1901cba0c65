"""A setting's role, declared where the setting is, decides where it counts: a result-shaping setting reaches
the pipeline fingerprint, the trainer's resume check, the encoder card and the shards' generation record;
one that only says where a run reads and writes, what it logs or how fast it runs reaches none of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from clsp.config import ROLES, fields_with_role, identity, setting
from clsp.errors import UserError
from clsp.generate.config import DDPMJob, GenerateJob
from clsp.generate.ddpm_training import resume_settings
from clsp.generate.job import generation_record
from clsp.io import load_torch
from clsp.pipeline import Pipeline, load_config
from clsp.train.backbones import load_encoder
from clsp.train.config import TrainJob
from clsp.train.trainer import CHECKPOINT, Trainer
from support import make_train_shards

ROOT = Path(__file__).resolve().parents[1]
# one new setting per role, with the value it takes when changed
NEW = {"result": ("new_result", 2), "location": ("new_location", "elsewhere"), "logging": ("new_logging", 7),
       "speed": ("new_speed", 3)}


class RoleTrainJob(TrainJob):
    new_result: int = setting(1, "Shapes the weights.", ge=0)
    new_location: str = setting("here", "Where something is written.", role="location")
    new_logging: int = setting(1, "How often something is logged.", role="logging", ge=1)
    new_speed: int = setting(1, "How many threads do the same work.", role="speed", ge=1)


class RoleGenerateJob(GenerateJob):
    new_result: int = RoleTrainJob.model_fields["new_result"]
    new_location: str = RoleTrainJob.model_fields["new_location"]
    new_logging: int = RoleTrainJob.model_fields["new_logging"]
    new_speed: int = RoleTrainJob.model_fields["new_speed"]


class RoleDDPMJob(DDPMJob):
    new_result: int = RoleTrainJob.model_fields["new_result"]
    new_location: str = RoleTrainJob.model_fields["new_location"]
    new_logging: int = RoleTrainJob.model_fields["new_logging"]
    new_speed: int = RoleTrainJob.model_fields["new_speed"]


def test_each_new_setting_has_its_role_and_only_result_settings_are_the_identity():
    assert set(NEW) == set(ROLES)
    for role, (name, _) in NEW.items():
        assert fields_with_role(RoleTrainJob, role) & set(dict(NEW.values())) == {name}
    job = RoleTrainJob(shards="s", out="o")
    assert "new_result" in identity(job)
    assert not {"new_location", "new_logging", "new_speed", "out", "shards", "data_root"} & identity(job).keys()
    with pytest.raises(ValueError, match="role 'fast'"):
        setting(1, "A typo in a role.", role="fast")


def _pipeline_prints(tmp_path: Path, name: str | None = None, value: object = None) -> dict[str, str]:
    """The stage fingerprints of the repository's pipeline.yaml with run ``clsp``'s job extended by the new
    settings (``name`` set to ``value``)."""
    pipeline = Pipeline(load_config(ROOT / "pipeline.yaml", (f"run_dir={tmp_path / 'run'}",)))
    stage = pipeline.stages["train:clsp"]
    stage.job = RoleTrainJob.model_validate({**stage.job.model_dump(), **({name: value} if name else {})})
    return pipeline.fingerprints()


@pytest.mark.parametrize("role", ROLES)
def test_only_a_result_setting_changes_the_pipeline_fingerprints(role: str, tmp_path: Path):
    name, changed = NEW[role]
    before, after = _pipeline_prints(tmp_path), _pipeline_prints(tmp_path, name, changed)
    moved = {stage for stage in before if before[stage] != after[stage]}
    if role == "result":  # the run and everything downstream of it, nothing else
        assert moved == {"train:clsp"} | {stage for stage in before if stage.startswith("eval:clsp:")}
    else:
        assert moved == set()


@pytest.mark.parametrize("role", ROLES)
def test_only_a_result_setting_reaches_the_generation_record_and_the_ddpm_resume_check(role: str):
    name, changed = NEW[role]
    gen = RoleGenerateJob(name="digits", shards="s")
    records = [generation_record(job, "model", "0123", "fp32") for job in (gen, gen.replace(**{name: changed}))]
    assert (name in records[0]) == (role == "result")
    assert (records[0] != records[1]) == (role == "result")
    ddpm = RoleDDPMJob(name="digits", out="o")
    settings = [resume_settings(job) for job in (ddpm, ddpm.replace(**{name: changed}))]
    assert (settings[0] != settings[1]) == (role == "result")
    assert "steps" not in settings[0] and "grad_clip" in settings[0]  # a run may resume to train longer


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, RoleTrainJob]:
    """One tiny training run of the extended job, finished and checkpointed."""
    tmp = tmp_path_factory.mktemp("roles")
    shards = make_train_shards(tmp / "shards", num_anchors=16, shard_size=16)
    job = RoleTrainJob(shards=str(shards), out=str(tmp / "run"), method="simclr", backbone="resnet-narrow",
                       epochs=1, batch_size=8, workers=0, precision="fp32", proj_hidden_dim=32, proj_output_dim=16,
                       warmup_epochs=1, lr=0.1, augment="cpu")
    Trainer(job).fit()
    return tmp / "run", job


def test_the_checkpoint_and_the_card_record_the_result_settings_only(trained):
    out, _ = trained
    saved = load_torch(out / CHECKPOINT)["settings"]
    _, card = load_encoder(out)
    for record in (saved, card.settings):
        assert record["new_result"] == 1
        assert not {"new_location", "new_logging", "new_speed", "out", "shards", "log_every", "compile"} & set(record)


@pytest.mark.parametrize("role", ROLES)
def test_only_a_changed_result_setting_refuses_to_resume(trained, role: str):
    out, job = trained
    name, changed = NEW[role]
    rerun = job.replace(**{name: changed})
    if role == "result":
        with pytest.raises(UserError, match=f"other settings \\({name}: 1 there, 2 now\\)"):
            Trainer(rerun).maybe_resume()
    else:
        assert Trainer(rerun).maybe_resume() is True
