"""Stage 3: linear and kNN against independent references, the feature cache, the positives
diagnostics on shards with known answers, one-line errors, and the side-by-side report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clsp.datasets import ArrayDataset, get_dataset
from clsp.evaluate.cli import main
from clsp.evaluate.features import extract_features, load_frozen_encoder
from clsp.evaluate.knn import knn_accuracy
from clsp.evaluate.linear import train_linear
from clsp.evaluate.positives import positives_stats
from clsp.evaluate.report import record_result, write_report
from clsp.shards import schema, writer
from support import make_encoder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def encoders(workdir: Path) -> dict[str, Path]:
    """A CLSP-SimCLR and a SimCLR encoder (fixed random weights) and a shared feature cache."""
    return {"clsp": make_encoder(workdir / "clsp", 0, method="simclr", clsp_lambda=1.0),
            "baseline": make_encoder(workdir / "baseline", 1, method="simclr", clsp_lambda=0.0)}


@pytest.fixture(scope="module")
def cache(workdir: Path) -> Path:
    return workdir / "cache"


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits", "train"), get_dataset("digits", "test")


@pytest.fixture(scope="module")
def folders(workdir: Path, digits) -> dict[str, Path]:
    """Small image folders cut from digits: labelled train/ + test/ (10 and 5 classes), and a flat one."""
    train, test = digits
    folders = {"labelled": workdir / "digits-folder", "five": workdir / "five-digits", "flat": workdir / "flat"}
    for key, classes, per_class in (("labelled", 10, 8), ("five", 5, 4)):
        for split, ds in (("train", train), ("test", test)):
            labels = ds.labels()
            for c in range(classes):
                (folders[key] / split / f"class{c}").mkdir(parents=True)
                for i in np.flatnonzero(labels == c)[:per_class // (2 if split == "test" else 1)]:
                    Image.fromarray(ds.array([i])[0]).save(folders[key] / split / f"class{c}" / f"{i}.png")
    folders["flat"].mkdir()
    for i in range(6):
        Image.fromarray(train.array([i])[0]).save(folders["flat"] / f"{i}.png")
    return folders


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_error_line(result, *fragments: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_linear_probe_matches_logistic_regression(encoders, cache, digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    encoder = load_frozen_encoder(encoders["clsp"])
    train, test = digits
    x_train = extract_features(encoder, train, cache_dir=cache)
    x_test = extract_features(encoder, test, cache_dir=cache)
    ours = train_linear(x_train, train.labels(), x_test, test.labels(), num_classes=10, epochs=10,
                        protocol="standardized")
    # the same model (standardised features, softmax regression), weakly regularised, fitted by L-BFGS
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=100.0)).fit(x_train, train.labels())
    ref_top1 = reference.score(x_test, test.labels()) * 100
    ref_top5 = np.mean([y in np.argsort(-p)[:5] for p, y in zip(reference.predict_proba(x_test), test.labels())]) * 100
    assert ours["top1"] > 50  # far above chance (10%): the probe learned something
    assert abs(ours["top1"] - ref_top1) < 4, (ours["top1"], ref_top1)
    assert abs(ours["top5"] - ref_top5) < 4, (ours["top5"], ref_top5)
    assert ours["milestones"] == [6, 8] and ours["protocol"] == "standardized"


def test_knn_matches_brute_force_weighted_vote():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8))
    train_y, test_y = rng.integers(0, 4, 150), rng.integers(0, 4, 40)
    train_x = centres[train_y] + rng.normal(scale=1.2, size=(150, 8))
    test_x = centres[test_y] + rng.normal(scale=1.2, size=(40, 8))
    table = knn_accuracy(train_x, train_y, test_x, test_y, ks=(5, 20, 500), temperature=0.07)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sims = unit(test_x) @ unit(train_x).T
    expected = {}
    for k in (5, 20, 150):  # 500 is capped at the 150 training images
        hits = 0
        for row, label in zip(sims, test_y):
            votes = np.zeros(4)
            for j in np.argsort(-row)[:k]:
                votes[train_y[j]] += np.exp(row[j] / 0.07)
            hits += votes.argmax() == label
        expected[k] = hits / len(test_y) * 100
    assert table.keys() == expected.keys()
    for k in expected:
        assert table[k] == pytest.approx(expected[k]), k


def test_feature_cache_reused_and_invalidated(tmp_path, digits):
    directory = make_encoder(tmp_path / "enc", 0)
    test = digits[1]
    dataset = ArrayDataset(name="digits-subset", split="test", num_classes=10, mean=test.mean, std=test.std,
                           images=test.array(range(100)), targets=test.labels()[:100])
    calls = []

    def load():
        encoder = load_frozen_encoder(directory)
        encoder.module.register_forward_hook(lambda *_: calls.append(1))
        return encoder

    first = extract_features(load(), dataset, cache_dir=tmp_path / "cache", batch_size=40)
    assert len(calls) == 3  # 100 images in batches of 40
    again = extract_features(load(), dataset, cache_dir=tmp_path / "cache", batch_size=40)
    assert len(calls) == 3 and np.array_equal(first, again)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".npz"]  # no temporaries left behind

    make_encoder(directory, seed=5)  # retrained encoder, same directory
    changed = extract_features(load(), dataset, cache_dir=tmp_path / "cache", batch_size=40)
    assert len(calls) == 6 and not np.allclose(first, changed)


def make_positive_shards(directory: Path, dataset, source: str) -> None:
    """Two shards of 3 candidates per anchor: copies of the anchor, or images of another class."""
    labels = dataset.labels()
    manifest = writer.init_manifest(directory, dataset=dataset.describe(), generation={"source": source},
                                    num_anchors=12, shard_size=6)
    for shard in range(manifest.num_shards):
        samples = []
        for a in manifest.anchor_range(shard):
            donor = a if source == "anchor" else int(np.flatnonzero(labels != labels[a])[a])
            samples.append(schema.ShardSample(a, np.repeat(dataset.array([donor]), 3, axis=0), label=int(labels[a])))
        writer.write_shard(directory, shard, samples)


def test_positives_identical_to_anchor_give_similarity_one(encoders, cache, workdir, digits):
    shards, run = workdir / "shards-identical", workdir / "positives-run"
    make_positive_shards(shards, digits[0], "anchor")
    result = invoke("positives", "--shards", shards, "--encoder", encoders["clsp"], "--out", run,
                    "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    stats = json.loads((run / "results.json").read_text())["positives"]["digits"]
    sims = stats["similarity"]
    assert stats["anchors"] == 12 and stats["positives"] == 36
    assert sims["synthetic"]["min"] == pytest.approx(1.0, abs=1e-4)
    assert sims["nearest_neighbour"]["mean"] < 1.0 and sims["augmented_view"]["mean"] < 1.0
    assert stats["synthetic_harder_than_neighbour"] is False
    assert stats["label_agreement"] == 1.0
    assert stats["diversity"]["pixel_l2"] == pytest.approx(0.0, abs=1e-5)
    assert stats["diversity"]["feature_cosine_distance"] == pytest.approx(0.0, abs=1e-4)
    with Image.open(run / "positives-similarity.png") as png:
        assert png.format == "PNG"
    assert "## positives: digits" in (run / "report.md").read_text()


def test_positives_of_another_class_disagree_with_the_label(encoders, cache, workdir, digits):
    shards = workdir / "shards-other-class"
    make_positive_shards(shards, digits[0], "other-class")
    stats = positives_stats(load_frozen_encoder(encoders["clsp"]), shards, data_root="data", cache_dir=cache)
    assert stats["label_agreement"] == 0.0
    assert stats["nearest_is_anchor"] == 0.0
    assert stats["similarity"]["synthetic"]["mean"] < 0.999


@pytest.mark.parametrize("case", ["other-architecture", "flat-folder-linear", "flat-folder-knn", "unknown-dataset",
                                  "missing-torchvision-data", "no-train-test-folders"])
def test_bad_inputs_give_one_error_line(case, encoders, folders, tmp_path):
    encoder = encoders["clsp"]
    if case == "other-architecture":
        encoder = make_encoder(tmp_path / "mislabelled")
        arch = json.loads((encoder / "encoder.json").read_text())
        (encoder / "encoder.json").write_text(json.dumps({**arch, "backbone": "resnet18"}))
    args = {
        "other-architecture": ["linear", "--dataset", "digits"],
        "flat-folder-linear": ["linear", "--dataset", f"imagefolder:{folders['flat']}"],
        "flat-folder-knn": ["knn", "--dataset", f"imagefolder:{folders['flat']}"],
        "unknown-dataset": ["knn", "--dataset", "mnist-nope"],
        "missing-torchvision-data": ["transfer", "--datasets", "digits,cifar10", "--no-download",
                                     "--data-root", tmp_path / "empty"],
        "no-train-test-folders": ["linear", "--dataset", f"imagefolder:{folders['labelled'] / 'train'}"],
    }[case]
    fragments = {"other-architecture": ["not a resnet18", "conv1.weight"],
                 "flat-folder-linear": ["no labels", "linear"],
                 "flat-folder-knn": ["no labels", "kNN"], "unknown-dataset": ["unknown dataset"],
                 "missing-torchvision-data": ["cifar10", "--data-root"],
                 "no-train-test-folders": ["no train/ sub-folder"]}[case]
    result = invoke(*args, "--encoder", encoder, "--out", tmp_path / "run")
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "run" / "results.json").exists()


def test_transfer_flip_and_embed_plot_on_image_folders(encoders, folders, cache, workdir):
    run, name, five = workdir / "transfer-run", f"imagefolder:{folders['labelled']}", f"imagefolder:{folders['five']}"
    result = invoke("transfer", "--encoder", encoders["clsp"], "--datasets", f"{name},{five}", "--epochs", 3,
                    "--protocol", "authors", "--out", run, "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    rows = json.loads((run / "results.json").read_text())["transfer"]
    assert set(rows) == {name, five}
    assert rows[name]["train_size"] == 80 and rows[name]["test_size"] == 40 and rows[name]["flip"]
    assert rows[five]["num_classes"] == 5 and 0 <= rows[five]["top1"] <= rows[five]["top5"] == 100.0
    assert any("-flip-" in p.name for p in cache.iterdir())
    report = (run / "report.md").read_text()
    assert "## linear transfer" in report
    assert f"| {name} | 10 | 80 | 40 |" in report and f"| {five} | 5 | 20 | 10 |" in report

    result = invoke("embed-plot", "--encoder", encoders["clsp"], "--dataset", name, "--out", run,
                    "--png", run / "tsne.png", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    with Image.open(run / "tsne.png") as png:
        assert png.format == "PNG"
    assert json.loads((run / "results.json").read_text())["embed-plot"][name]["points"] == 40


def test_report_puts_clsp_and_baseline_beside_the_paper(encoders, cache, workdir):
    runs = {label: workdir / f"eval-{label}" for label in encoders}
    for label, run in runs.items():
        for command in (["linear", "--epochs", 3], ["knn", "--k", 5, "--k", 20]):
            result = invoke(*command, "--encoder", encoders[label], "--dataset", "digits", "--out", run,
                            "--cache-dir", cache)
            assert result.exit_code == 0, result.output
        results = json.loads((run / "results.json").read_text())
        assert set(results) == {"linear", "knn"} and set(results["knn"]["digits"]["top1_by_k"]) == {"5", "20"}
        own = (run / "report.md").read_text()
        assert "## linear probe: digits" in own and "## kNN: digits" in own

    report = write_report(runs, workdir / "report.md", dataset="digits").read_text()
    linear = {label: json.loads((run / "results.json").read_text())["linear"]["digits"] for label, run in runs.items()}
    assert f"| clsp | simclr | 1 | resnet-narrow | {linear['clsp']['top1']:.2f} |" in report
    assert f"| baseline | simclr | 0 | resnet-narrow | {linear['baseline']['top1']:.2f} |" in report
    assert "paper linear top-1" in report and report.count("| n/a |") == 2  # digits: no paper number

    # the paper column picks each run's method on a dataset the paper reports
    for label, run in runs.items():
        record_result(run, "linear", "cifar10", {**linear[label], "dataset": "cifar10"})
    cifar = write_report(runs, workdir / "report-cifar10.md", dataset="cifar10").read_text()
    assert "94.45 (CLSP-SimCLR)" in cifar and "91.45 (SimCLR)" in cifar
