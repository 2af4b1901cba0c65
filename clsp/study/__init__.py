"""``clsp study CONFIG``: does the CLSP term help? Paired seeds, intervals, one table.

For each method and seed the study trains the CLSP run and its baseline (lambda 0) with the same seed,
so they share initial weights and epoch order and differ only in the CLSP term. ``--controls self,oracle``
adds arms that differ from the CLSP run only in what fills the positive (``positive_source``): an extra
augmented view of the anchor, or another training image of its class. All runs reuse the configuration's
one shard set. Each run and each evaluation is a stage of one pipeline (its own ``RUN_DIR/study``), so a
killed study resumes where it stopped.

``--grid train.KEY=V1,V2`` (repeatable) first trains every cell of the grid's cartesian product on the
training split less a fixed, stratified validation split, and scores it on those held-out images; the test
split is not read. Per method, the baseline's settings are those of the cell with the best baseline linear
top-1 on validation, and among the cells sharing them the one with the best CLSP linear top-1 is selected
(ties: the higher kNN top-1, then the earlier cell; ``select_cell``); only that cell is then trained on the
whole training split and measured on the test split. A baseline never reads the CLSP-only settings
(``setting(clsp_only=True)``), so cells that differ only in those share one baseline per seed.

The report gives each arm's mean top-1 with its 95 % t-interval, the paired CLSP - baseline (and CLSP -
control) differences with theirs, the baseline's spread over seeds (the noise floor a difference must
clear), and marks runs whose training sat at collapse.
"""

from clsp.study.command import MAX_STUDY_RUNS, study
from clsp.study.grid import MAX_GRID_CELLS, cell_label, parse_grid
from clsp.study.report import grid_markdown, study_markdown
from clsp.study.results import METRICS, collapse_marks, collapsed, summarise
from clsp.study.runs import VALIDATION_PREFIX, arm_runs, study_runs
from clsp.study.selection import select_cell, validation_grid
from clsp.study.stats import interval, spread

__all__ = ["MAX_GRID_CELLS", "MAX_STUDY_RUNS", "METRICS", "VALIDATION_PREFIX", "arm_runs", "cell_label",
           "collapse_marks", "collapsed", "grid_markdown", "interval", "parse_grid", "select_cell", "spread",
           "study", "study_markdown", "study_runs", "summarise", "validation_grid"]
