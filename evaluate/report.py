"""Where evaluation results go: ``results.json`` and ``report.md`` in a run directory, and the
side-by-side report of CLSP and baseline runs beside the paper's numbers.

``results.json`` is ``{command: {dataset: payload}}``; each command merges its entry in atomically,
under a lock.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from clsp.errors import UserError
from clsp.io import atomic_path, exclusive_lock, write_bytes_atomic, write_json_atomic

RESULTS_FILE = "results.json"
RESULTS_LOCK = ".results.lock"
REPORT_LOCK = ".report.lock"
REPORT_FILE = "report.md"

PROTOCOL_NAMES = {"authors": "authors' protocol (METHOD.md section 4)",
                  "standardized": "standardised-feature probe (not comparable with the paper)"}
DETERMINISTIC_PROBE = "deterministic probe (standardised logistic regression)"  # clsp.evaluate.linear; not the paper's


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); delete it and rerun the evaluation") from None
    if not isinstance(results, dict) or not all(isinstance(entry, dict) for entry in results.values()):
        raise UserError(f"{path} is not a command -> dataset -> result mapping; delete it and rerun the evaluation")
    return results


def record_result(run_dir: str | Path, command: str, dataset: str, payload: Mapping[str, Any]) -> Path:
    """Merge ``payload`` into ``results.json`` under ``[command][dataset]``.

    Read-modify-rename under an exclusive lock, so concurrent commands writing one run directory never
    lose each other's entries.
    """
    path = Path(run_dir) / RESULTS_FILE
    with exclusive_lock(Path(run_dir) / RESULTS_LOCK):
        results = load_results(run_dir)
        results.setdefault(command, {})[dataset] = dict(payload)
        write_json_atomic(path, results)
    return path


def write_section(run_dir: str | Path, title: str, body: str) -> Path:
    """Put a ``## title`` section into the run's ``report.md``, replacing a section of the same title
    (rerunning a command updates its section instead of adding another); rewritten atomically, under a
    lock, so commands finishing at once in one run directory keep each other's sections."""
    path = Path(run_dir) / REPORT_FILE
    with exclusive_lock(Path(run_dir) / REPORT_LOCK):
        old = path.read_text() if path.is_file() else "# Evaluation report\n"
        head, *sections = old.split("\n## ")
        kept = [section for section in sections if section.split("\n", 1)[0].strip() != title]
        text = "\n## ".join([head.rstrip() + "\n", *[section.rstrip() + "\n" for section in kept]])
        write_bytes_atomic(path, f"{text.rstrip()}\n\n## {title}\n\n{body.rstrip()}\n".encode())
    return path


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, missing values as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2,
                   numeric: Sequence[int] = ()) -> str:
    """A Markdown table; the columns at the indices ``numeric`` are right-aligned."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if i in numeric else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(fmt(cell, digits) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def paper_column(method: str | None, clsp_lambda: float | None) -> str | None:
    """The METHOD.md column a run corresponds to (``CLSP-SimCLR``, ``MoCo``, ...), if any."""
    from clsp.train.methods import display_name, registered

    if (method or "").lower() not in registered():
        return None
    name = display_name((method or "").lower())
    return f"CLSP-{name}" if clsp_lambda else name


def paper_linear_top1(dataset: str, method: str | None, clsp_lambda: float | None,
                      backbone: str | None = None) -> float | None:
    """The paper's linear top-1 for this dataset and method, or None where it reports none."""
    from clsp.evaluate.paper import LINEAR_TOP1, LINEAR_TOP1_RESNET50

    column = paper_column(method, clsp_lambda)
    table = (LINEAR_TOP1_RESNET50 if backbone == "resnet50" else LINEAR_TOP1).get(dataset, {})
    return table.get(column) if column is not None else None


def _encoder_info(results: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    for command in ("linear", "knn", "embed-plot", "positives"):
        entry = results.get(command, {}).get(dataset)
        if entry and "encoder" in entry:
            return entry["encoder"]
    return {}


def train_summary(train_dir: str | Path | None) -> dict[str, Any]:
    """The ``train_summary.json`` of a training run directory; empty where there is none or it is unreadable."""
    path = Path(train_dir) / "train_summary.json" if train_dir else None
    try:
        summary = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return summary if isinstance(summary, dict) else {}


def collapse_note(label: str, encoder_dir: str | None) -> str | None:
    """A line saying that the run's training sat at collapse (``clsp.train.collapse``), from the
    ``train_summary.json`` beside its encoder; None when it did not or no summary is there."""
    record = train_summary(encoder_dir).get("collapse")
    if not isinstance(record, dict):
        return None
    epochs = ", ".join(map(str, record.get("epochs") or []))
    if not epochs:
        return None
    if record.get("collapsed"):
        return (f"**{label}: COLLAPSED at epochs {epochs}** (its projections ended nearly identical: std of the "
                f"normalised projections x sqrt(d) below {record.get('threshold')}); its numbers measure a collapsed "
                "encoder.")
    return f"{label}: sat at collapse at epochs {epochs} and recovered by the last epoch."


def neighbour_row(label: str, train_dir: str | None) -> list[Any] | None:
    """``[label, nn_acc % at epoch 1, the middle epoch, the last, the synthetic view's at the last]`` of a run
    whose training recorded NNCLR's neighbour accuracy per epoch; None for other runs."""
    epochs = [e for e in train_summary(train_dir).get("per_epoch") or [] if isinstance(e, dict) and "nn_acc" in e]
    if not epochs:
        return None
    synthetic = epochs[-1].get("nn_acc_synthetic")
    return [label, *(100 * epochs[i]["nn_acc"] for i in (0, len(epochs) // 2, -1)),
            None if synthetic is None else 100 * synthetic]


def write_report(run_dirs: Mapping[str, str | Path], out: str | Path, dataset: str) -> Path:
    """Put runs (e.g. ``{"clsp": dir, "baseline": dir}``) side by side with the paper's numbers.

    Each run directory holds the ``results.json`` the ``clsp-eval`` commands wrote. ``out`` is the
    Markdown file to write (or a directory, which gets ``report.md``). Returns the written path.
    """
    out = Path(out)
    if out.is_dir():
        out = out / REPORT_FILE
    all_results = {label: load_results(path) for label, path in run_dirs.items()}
    rows, linear, protocols, notes = [], {}, set(), []
    for label, results in all_results.items():
        enc = _encoder_info(results, dataset)
        note = collapse_note(label, enc.get("path"))
        if note:
            notes.append(note)
        lin = results.get("linear", {}).get(dataset, {})
        knn = results.get("knn", {}).get(dataset, {})
        linear[label] = lin.get("top1")
        protocols.add(lin.get("protocol"))
        paper = paper_linear_top1(dataset, enc.get("method"), enc.get("clsp_lambda"), enc.get("backbone"))
        column = paper_column(enc.get("method"), enc.get("clsp_lambda"))
        weight = enc.get("clsp_lambda")
        rows.append([label, enc.get("method"), None if weight is None else f"{weight:g}", enc.get("backbone"),
                     lin.get("top1"), lin.get("top5"), (lin.get("deterministic") or {}).get("top1"),
                     knn.get("best_top1"), knn.get("best_k"),
                     f"{paper:.2f} ({column})" if paper is not None else "n/a"])
    protocols.discard(None)
    authors = protocols == {"authors"}
    headers = ["run", "method", "lambda", "backbone", "linear top-1", "linear top-5", "det. probe top-1",
               "kNN top-1", "best k"]
    splits = sorted({entry.get("split", "test") for results in all_results.values()
                     for command in ("linear", "knn") for entry in results.get(command, {}).values()})
    if authors:
        headers.append("paper linear top-1")
    else:
        rows = [row[:-1] for row in rows]
    named = ", ".join(PROTOCOL_NAMES.get(p, p) for p in sorted(protocols)) or "no linear probe"
    parts = [f"# CLSP evaluation: {dataset}",
             f"Linear probe ({named}), {DETERMINISTIC_PROBE} and kNN top-1 (%) on the "
             f"{' and '.join(splits) or 'test'} split."
             + (" The paper column is METHOD.md section 5 (ResNet-18, 1000 epochs), n/a where the paper reports "
                "no number for this dataset." if authors else
                " The paper's numbers are not shown: they were measured with the authors' protocol."),
             markdown_table(headers, rows), *notes]
    neighbours = [row for label, results in all_results.items()
                  if (row := neighbour_row(label, _encoder_info(results, dataset).get("path"))) is not None]
    if neighbours:
        parts.append("Support-set neighbours (NNCLR): the share (%) of view-1 neighbours with the anchor's label, "
                     "by training epoch, and of the synthetic view's neighbours (positive_loss nn); a positive that "
                     "degrades the support set shows here first.")
        parts.append(markdown_table(["run", "epoch 1", "middle epoch", "last epoch", "synthetic view, last epoch"],
                                    neighbours, digits=1))
    labels = [label for label, value in linear.items() if value is not None]
    if len(labels) >= 2:
        first = labels[0]
        parts.append("Linear top-1 difference: " + ", ".join(
            f"{first} - {other}: {linear[first] - linear[other]:+.2f}" for other in labels[1:]))
    pos_rows = []
    for label, results in all_results.items():
        pos = results.get("positives", {}).get(dataset)
        if pos:
            sims = pos["similarity"]
            pos_rows.append([label, sims["augmented_view"]["mean"], sims["nearest_neighbour"]["mean"],
                             sims["synthetic"]["mean"], pos.get("label_agreement"),
                             pos.get("neighbour_label_agreement"), pos["diversity"].get("feature_cosine_distance"),
                             pos["diversity"].get("pixel_l2")])
    if pos_rows:
        parts.append("Synthetic positives, measured with each run's encoder (mean cosine similarity to the "
                     "anchor; label agreement = nearest real image has the anchor's label):")
        parts.append(markdown_table(["run", "augmented view", "nearest neighbour", "synthetic", "synthetic label agr.",
                                     "neighbour label agr.", "candidate cos. dist.", "candidate pixel L2"], pos_rows,
                                    digits=3))
    write_bytes_atomic(out, ("\n\n".join(parts) + "\n").encode())
    return out


def save_figure(figure, path: str | Path) -> Path:
    """Write a matplotlib ``Figure`` as PNG atomically (no pyplot, so no global backend state)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    return path


def _encoder_line(encoder: Mapping[str, Any]) -> str:
    method = encoder.get("method") or "unknown method"
    weight = encoder.get("clsp_lambda")
    method += f" + CLSP (lambda {weight:g})" if weight else ""
    return (f"Encoder `{encoder.get('path')}`: {encoder.get('backbone')}, {method}, "
            f"weights {encoder.get('fingerprint')}.")


def _image(path: str, run_dir: Path) -> str:
    return f"![{Path(path).name}]({os.path.relpath(path, run_dir)})"


def command_section(command: str, payload: Mapping[str, Any], run_dir: str | Path) -> tuple[str, str]:
    """The ``report.md`` section (title, Markdown body) for one command's results."""
    run_dir = Path(run_dir)
    if command == "transfer":
        rows = [[r["dataset"], r["num_classes"], r["train_size"], r["test_size"], r["top1"], r["top5"]]
                for r in payload["rows"]]
        return "linear transfer", "\n\n".join([
            _encoder_line(payload["rows"][0]["encoder"]),
            f"Linear probe ({PROTOCOL_NAMES.get(payload['rows'][0].get('protocol'), 'standardized')}) on each "
            f"dataset: {payload['rows'][0]['epochs']} epochs, top-1/top-5 (%) on its test split.",
            markdown_table(["dataset", "classes", "train", "test", "top-1", "top-5"], rows)])
    parts = [_encoder_line(payload["encoder"])]
    if command == "linear":
        protocol = payload.get("protocol", "standardized")
        parts.append(f"Protocol: {PROTOCOL_NAMES.get(protocol, protocol)}; scored on the "
                     f"{payload.get('split', 'test')} split.")
        parts.append(markdown_table(
            ["top-1", "top-5", "epochs", "lr", "milestones", "batch", "flip", "train", "test"],
            [[payload["top1"], payload["top5"], payload["epochs"], payload["lr"],
              ",".join(map(str, payload["milestones"])), payload["batch_size"], payload["flip"],
              payload["train_size"], payload["test_size"]]]))
        probe = payload.get("deterministic")
        if probe:
            parts.append(f"Beside it, the {DETERMINISTIC_PROBE}, C = {probe['C']:g}, {probe['solver']} "
                         f"({probe['iterations']} iterations{'' if probe['converged'] else ', not converged'}; not "
                         f"the paper's protocol): top-1 **{probe['top1']:.2f}**, top-5 {probe['top5']:.2f}.")
        return f"linear probe: {payload['dataset']}", "\n\n".join(parts)
    if command == "knn":
        parts.append(f"Weighted cosine kNN (temperature {payload['temperature']}): best top-1 "
                     f"**{payload['best_top1']:.2f}** at k = {payload['best_k']}.")
        parts.append(markdown_table(["k", "top-1"], payload["top1_by_k"].items()))
        return f"kNN: {payload['dataset']}", "\n\n".join(parts)
    if command == "positives":
        sims = payload["similarity"]
        parts.append(f"{payload['anchors']} anchors and {payload['positives']} synthetic positives from "
                     f"`{payload['shards']}`; cosine similarity of backbone features to the anchor's:")
        parts.append(markdown_table(["compared with", "mean", "median", "std", "n"],
                                    [[name.replace("_", " "), s["mean"], s["median"], s["std"], s["n"]]
                                     for name, s in sims.items()], digits=4))
        harder = payload["synthetic_harder_than_neighbour"]
        parts.append("\n".join([
            f"- synthetic positives harder than nearest neighbours: {fmt(harder)}",
            f"- label agreement of synthetic positives (nearest real image has the anchor's label): "
            f"{fmt(payload['label_agreement'], 3)}",
            f"- label agreement of nearest neighbours: {fmt(payload['neighbour_label_agreement'], 3)}",
            f"- synthetic positives whose nearest real image is their anchor: {fmt(payload['nearest_is_anchor'], 3)}",
            f"- diversity among an anchor's candidates: mean pairwise cosine distance "
            f"{fmt(payload['diversity']['feature_cosine_distance'], 3)}, mean pairwise pixel L2 "
            f"{fmt(payload['diversity']['pixel_l2'], 3)}"]))
        if payload.get("histogram"):
            parts.append(_image(payload["histogram"], run_dir))
        return f"positives: {payload['dataset']}", "\n\n".join(parts)
    if command == "embed-plot":
        parts.append(f"t-SNE of {payload['points']} {payload['split']} images.")
        parts.append(_image(payload["png"], run_dir))
        return f"t-SNE: {payload['dataset']}", "\n\n".join(parts)
    raise ValueError(f"no report section for command {command!r}")
