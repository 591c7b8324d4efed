"""GLUE for any Hugging Face sequence-classification model: data, metrics, evaluation, submissions.

Independent of the rest of spartan. Data comes from the Hub (``nyu-mll/glue``), from a folder in
the official GLUE distribution layout (offline), or from CSV/JSON files with the Hub's columns.
Metrics are computed locally (no ``evaluate.load`` download) with the Hub metric's key names.
Submission files are written through ``spartan._io`` (atomic replacement), the one module of the
package this one imports.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import datasets
import numpy as np
import numpy.typing as npt
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError
from scipy.stats import pearsonr, spearmanr
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from . import _io

__all__ = [
    "GLUE_TASKS",
    "GlueTask",
    "compute_metrics",
    "evaluate",
    "get_task",
    "glue_score",
    "load_glue",
    "predict",
    "tokenize_glue",
]

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
HUB_CARD = "README.md"  # the first file datasets fetches for a Hub dataset


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its columns, labels, metrics and files.

    Attributes:
        name: the task's config name on the Hub, e.g. ``"rte"``.
        text_fields: the one or two text columns, named as on the Hub.
        label_names: class names in class-id order; empty for the regression task STS-B.
        tsv_labels: how each class id is written in the GLUE TSV files and submission files.
        metrics: the keys :func:`compute_metrics` returns for this task.
        main_metric: the metric to select models on: ``matthews_correlation`` (CoLA, AX),
            ``f1`` (MRPC, QQP), ``pearson`` (STS-B), ``accuracy`` (the others).
        folder: the task's folder in the official GLUE distribution.
        split_files: split name -> file name inside ``folder``.
        submission_files: test split -> name of the file the GLUE server expects.
    """

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    tsv_labels: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    folder: str
    split_files: Mapping[str, str] = field(hash=False)
    submission_files: Mapping[str, str] = field(hash=False)

    def __post_init__(self) -> None:
        for name in ("split_files", "submission_files"):  # read-only, like the other fields
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Outputs the model needs: 1 for STS-B, else the number of classes."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def validation_split(self) -> str:
        """The default evaluation split (``validation_matched`` for MNLI)."""
        return next(split for split in self.split_files if split.startswith("validation"))

    def format_prediction(self, prediction: float) -> str:
        """A prediction as the GLUE server reads it: the class's TSV label, or a score in [0, 5]."""
        if self.is_regression:
            return f"{min(max(float(prediction), 0.0), 5.0):.3f}"
        return self.tsv_labels[int(prediction)]


_BINARY = ("0", "1")
_NLI_3 = ("entailment", "neutral", "contradiction")
_NLI_2 = ("entailment", "not_entailment")
_STANDARD_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
_MNLI_FILES = {
    "train": "train.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}


def _premise_hypothesis_task(
    name: str,
    folder: str,
    metrics: tuple[str, ...],
    main_metric: str,
    split_files: dict[str, str],
    submission_files: dict[str, str],
) -> GlueTask:
    """A three-way NLI task (MNLI and its diagnostic set), labels written by name."""
    return GlueTask(name, ("premise", "hypothesis"), _NLI_3, _NLI_3, metrics, main_metric, folder, split_files,
                    submission_files)


def _standard_task(
    name: str,
    folder: str,
    text_fields: tuple[str, ...],
    label_names: tuple[str, ...],
    metrics: tuple[str, ...] = ("accuracy",),
    main_metric: str = "accuracy",
    tsv_labels: tuple[str, ...] = _BINARY,
) -> GlueTask:
    """A task with train/dev/test.tsv files and one submission file named after its folder."""
    return GlueTask(
        name,
        text_fields,
        label_names,
        tsv_labels,
        metrics,
        main_metric,
        folder,
        _STANDARD_FILES,
        {"test": f"{folder}.tsv"},
    )


GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        _standard_task(
            "cola",
            "CoLA",
            ("sentence",),
            ("unacceptable", "acceptable"),
            ("matthews_correlation",),
            "matthews_correlation",
        ),
        _standard_task("sst2", "SST-2", ("sentence",), ("negative", "positive")),
        _standard_task(
            "mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"), "f1"
        ),
        _standard_task(
            "qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"), "f1"
        ),
        _standard_task(
            "stsb", "STS-B", ("sentence1", "sentence2"), (), ("pearson", "spearmanr"), "pearson", tsv_labels=()
        ),
        _premise_hypothesis_task(
            "mnli", "MNLI", ("accuracy",), "accuracy", _MNLI_FILES,
            {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"},
        ),
        _standard_task("qnli", "QNLI", ("question", "sentence"), _NLI_2, tsv_labels=_NLI_2),
        _standard_task("rte", "RTE", ("sentence1", "sentence2"), _NLI_2, tsv_labels=_NLI_2),
        _standard_task("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
        # The diagnostic set: test only, predicted with an MNLI model; the server scores it by R3 (Matthews).
        _premise_hypothesis_task(
            "ax", "diagnostic", ("matthews_correlation",), "matthews_correlation",
            {"test": "diagnostic.tsv"}, {"test": "AX.tsv"},
        ),
    )
}

# Normalised spellings (lower case, no "-", "_" or spaces) that name a task differently.
_ALIASES = {
    "mnlim": "mnli",
    "mnlimm": "mnli",
    "mnlimatched": "mnli",
    "mnlimismatched": "mnli",
    "diagnostic": "ax",
}


def get_task(name: str | GlueTask) -> GlueTask:
    """The task called ``name``, case-insensitively; ``"SST-2"``, ``"STS-B"``, ``"mnli-mm"`` etc. work.

    ``"mnli-m"``/``"mnli-mm"`` name the MNLI task; choose matched or mismatched with ``split=``.
    """
    if isinstance(name, GlueTask):
        return name
    key = re.sub(r"[\s_-]", "", str(name).lower())
    try:
        return GLUE_TASKS[_ALIASES.get(key, key)]
    except KeyError:
        raise ValueError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(GLUE_TASKS)}") from None


# ----------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class _TsvLayout:
    """Where a task's fields are in its official TSV files."""

    text_columns: tuple[str, ...]  # header names of the columns holding ``GlueTask.text_fields``
    label_column: str | None  # None: no labelled files (AX)
    test_index_column: str = "index"
    headerless_columns: tuple[str, ...] = ()  # names for the columns of header-less labelled files


_TSV_LAYOUTS = {
    "cola": _TsvLayout(("sentence",), "label", headerless_columns=("source", "label", "mark", "sentence")),
    "sst2": _TsvLayout(("sentence",), "label"),
    "mrpc": _TsvLayout(("#1 String", "#2 String"), "Quality"),
    "qqp": _TsvLayout(("question1", "question2"), "is_duplicate", test_index_column="id"),
    "stsb": _TsvLayout(("sentence1", "sentence2"), "score"),
    "mnli": _TsvLayout(("sentence1", "sentence2"), "gold_label"),
    "qnli": _TsvLayout(("question", "sentence"), "label"),
    "rte": _TsvLayout(("sentence1", "sentence2"), "label"),
    "wnli": _TsvLayout(("sentence1", "sentence2"), "label"),
    "ax": _TsvLayout(("sentence1", "sentence2"), None),
}


def load_glue(
    task: str | GlueTask,
    data_dir: str | Path | None = None,
    data_files: Mapping[str, str | Path] | None = None,
) -> DatasetDict:
    """A GLUE task's splits with the Hub's columns: text fields, ``label`` and ``idx``.

    ``label`` is the class id (-1 on unlabelled test rows; a float score for STS-B). Splits are
    ``train``, ``validation`` and ``test`` (MNLI: ``validation_matched``/``_mismatched``,
    ``test_matched``/``_mismatched``; AX: ``test`` only).

    Args:
        task: a task name or :class:`GlueTask`.
        data_dir: folder in the official GLUE layout (``DATA_DIR/RTE/train.tsv``, ...), read
            offline. Test files are optional; the other files must exist. Rows whose number of
            fields differs from the header are skipped, as the official loaders do.
        data_files: split -> ``.csv``, ``.json`` or ``.jsonl`` file with the Hub's columns
            (``label`` and ``idx`` may be missing: they become -1 and the row number).

    With neither, the task is loaded from the Hub (``nyu-mll/glue``), or from the local cache offline
    (``HF_HUB_OFFLINE=1``). When the Hub cannot be reached and the task is not cached, a one-line
    ``ConnectionError`` is raised at once (huggingface_hub would otherwise retry several times with
    back-off before failing).
    """
    task = get_task(task)
    if data_dir is not None and data_files is not None:
        raise ValueError("pass either data_dir or data_files, not both")
    if data_dir is not None:
        splits = _present_splits(task, Path(data_dir))
        return DatasetDict({split: _read_tsv_split(task, Path(data_dir), split) for split in splits})
    if data_files is not None:
        return DatasetDict({split: _load_data_file(task, Path(path)) for split, path in data_files.items()})
    unreachable = None if datasets.config.HF_HUB_OFFLINE else _hub_unreachable()
    if unreachable is not None and not _hub_cached():
        raise _hub_error(task, unreachable) from unreachable  # not cached: load_dataset would retry, then fail
    try:
        return load_dataset(HUB_DATASET, task.name)
    except ConnectionError as error:
        raise _hub_error(task, error) from error


def _hub_cached() -> bool:
    """Whether the dataset card is in the local Hub cache (``load_dataset`` then falls back to it)."""
    return isinstance(try_to_load_from_cache(HUB_DATASET, HUB_CARD, repo_type="dataset"), str)


def _hub_unreachable() -> Exception | None:
    """The error of one HEAD request for the dataset card, made without retries; ``None`` when the Hub
    answered (any HTTP status: ``load_dataset`` then reports what the answer means)."""
    endpoint = datasets.config.HF_ENDPOINT
    url = hf_hub_url(HUB_DATASET, HUB_CARD, repo_type="dataset", endpoint=endpoint)
    try:
        get_hf_file_metadata(url, endpoint=endpoint)
    except HfHubHTTPError:
        return None
    except Exception as error:  # network errors of the HTTP client huggingface_hub happens to use
        return error
    return None


def _hub_error(task: GlueTask, error: BaseException) -> ConnectionError:
    reason = (str(error).strip().splitlines() or [""])[0] or type(error).__name__
    return ConnectionError(
        f"could not load {HUB_DATASET} ({task.name}) from the Hugging Face Hub ({reason}); offline, pass "
        f"data_dir= a folder in the official GLUE layout (e.g. DATA_DIR/{task.folder}/"
        f"{next(iter(task.split_files.values()))}), or data_files={{split: path}} with CSV/JSON files"
    )


def _present_splits(task: GlueTask, data_dir: Path) -> list[str]:
    """The splits to read: every non-test split (required) and the test splits whose files exist."""
    labelled = [split for split in task.split_files if split not in task.submission_files]
    return [
        split
        for split, file_name in task.split_files.items()
        if split in labelled or not labelled or (data_dir / task.folder / file_name).is_file()
    ]


def _read_tsv_split(task: GlueTask, data_dir: Path, split: str) -> Dataset:
    path = data_dir / task.folder / task.split_files[split]
    if not path.is_file():
        expected = ", ".join(f"DATA_DIR/{task.folder}/{name}" for name in task.split_files.values())
        raise FileNotFoundError(
            f"{path} not found. data_dir must be a folder in the official GLUE layout (as written by "
            f"download_glue_data.py); for {task.name} it holds {expected} (test files optional)."
        )
    layout = _TSV_LAYOUTS[task.name]
    is_test = split in task.submission_files
    rows = _tsv_rows(path)
    if layout.headerless_columns and not is_test:
        header = list(layout.headerless_columns)
    else:
        _, header = next(rows, (0, []))
    wanted = [*layout.text_columns, layout.test_index_column if is_test else layout.label_column]
    missing = [column for column in wanted if column not in header]
    if missing:
        raise ValueError(
            f"{path}: column(s) {missing} missing from the header {header}; "
            f"is this the official GLUE {task.folder} file?"
        )
    position = {column: i for i, column in enumerate(header)}
    columns: dict[str, list] = {text_field: [] for text_field in task.text_fields} | {"label": [], "idx": []}
    skipped = 0
    for line_number, fields in rows:
        if len(fields) != len(header):
            skipped += 1
            continue
        try:
            label = -1 if is_test else _parse_label(task, fields[position[layout.label_column]])
            idx = int(fields[position[layout.test_index_column]]) if is_test else len(columns["idx"])
        except ValueError as error:
            raise ValueError(f"{path}, line {line_number}: {error}") from None
        for text_field, column in zip(task.text_fields, layout.text_columns):
            columns[text_field].append(fields[position[column]])
        columns["label"].append(label)
        columns["idx"].append(idx)
    if skipped:
        logger.warning("%s: skipped %d malformed row(s) (wrong number of fields)", path, skipped)
    return Dataset.from_dict(columns, features=_features(task))


def _tsv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-empty line; no quote processing, a leading BOM dropped."""
    with open(path, encoding="utf-8-sig", newline="\n") as file:
        for line_number, line in enumerate(file, start=1):
            line = line.removesuffix("\n").removesuffix("\r")
            if line:
                yield line_number, line.split("\t")


def _parse_label(task: GlueTask, value: str) -> int | float:
    if task.is_regression:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"score {value!r} is not a number") from None
    if value not in task.tsv_labels:
        raise ValueError(f"label {value!r} is not one of the allowed labels {', '.join(task.tsv_labels)}")
    return task.tsv_labels.index(value)


def _features(task: GlueTask) -> Features:
    label = Value("float32") if task.is_regression else ClassLabel(names=list(task.label_names))
    return Features(
        {text_field: Value("string") for text_field in task.text_fields} | {"label": label, "idx": Value("int32")}
    )


_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json"}


def _load_data_file(task: GlueTask, path: Path) -> Dataset:
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: data_files must be {', '.join(_FILE_BUILDERS)} files")
    dataset = load_dataset(builder, data_files=str(path), split="train")
    missing = [text_field for text_field in task.text_fields if text_field not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{path}: column(s) {missing} missing; {task.name} files need {list(task.text_fields)} "
            f"(and optionally label, idx), found {dataset.column_names}"
        )
    if "label" not in dataset.column_names:
        dataset = dataset.add_column("label", [-1] * len(dataset))
    if "idx" not in dataset.column_names:
        dataset = dataset.add_column("idx", list(range(len(dataset))))
    dataset = dataset.select_columns([*task.text_fields, "label", "idx"]).cast(_features(task))
    if not task.is_regression:
        labels = np.asarray(dataset["label"])
        if ((labels < -1) | (labels >= task.num_labels)).any():
            raise ValueError(
                f"{path}: labels must be class ids 0..{task.num_labels - 1} ({', '.join(task.label_names)}) "
                f"or -1 for unlabelled rows, found {sorted(set(labels.tolist()))}"
            )
    return dataset


def tokenize_glue(
    data: Dataset | DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    task: str | GlueTask,
    max_length: int = 128,
) -> Dataset | DatasetDict:
    """Tokenise the text fields (truncated to ``max_length``, unpadded) and rename ``label`` to ``labels``.

    The text columns are removed; ``idx`` is kept (drop it, or let ``Trainer`` drop it, before
    batches reach the model). Pad per batch with ``transformers.DataCollatorWithPadding``.
    """
    task = get_task(task)
    for dataset in data.values() if isinstance(data, DatasetDict) else [data]:
        missing = [column for column in (*task.text_fields, "label") if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"column(s) {missing} missing from the {task.name} data (found {dataset.column_names}); "
                f"load it with load_glue({task.name!r}, ...)"
            )

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[text_field] for text_field in task.text_fields]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    tokenized = data.map(tokenize, batched=True, remove_columns=list(task.text_fields), desc=f"Tokenizing {task.name}")
    return tokenized.rename_column("label", "labels")


# -------------------------------------------------------------------------------------- metrics


def _accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    return float(np.mean(predictions == references))


def _binary_f1(predictions: np.ndarray, references: np.ndarray) -> float:
    """F1 of the positive class 1 (0 when there are neither positive predictions nor references)."""
    true_positives = np.sum((predictions == 1) & (references == 1))
    errors = np.sum(predictions != references)
    denominator = 2 * true_positives + errors
    return float(2 * true_positives / denominator) if denominator else 0.0


def _matthews_correlation(predictions: np.ndarray, references: np.ndarray) -> float:
    """Matthews correlation (multi-class R_K); 0 when either side holds a single class."""
    num_classes = int(max(predictions.max(), references.max())) + 1
    predicted_counts = np.bincount(predictions, minlength=num_classes).astype(np.float64)
    true_counts = np.bincount(references, minlength=num_classes).astype(np.float64)
    total = float(len(references))
    correct = float(np.sum(predictions == references))
    covariance = correct * total - true_counts @ predicted_counts
    denominator = np.sqrt((total**2 - predicted_counts @ predicted_counts) * (total**2 - true_counts @ true_counts))
    return float(covariance / denominator) if denominator else 0.0


def _pearson(predictions: np.ndarray, references: np.ndarray) -> float:
    return float(pearsonr(predictions, references)[0])


def _spearman(predictions: np.ndarray, references: np.ndarray) -> float:
    return float(spearmanr(predictions, references)[0])


_METRICS = {
    "accuracy": _accuracy,
    "f1": _binary_f1,
    "matthews_correlation": _matthews_correlation,
    "pearson": _pearson,
    "spearmanr": _spearman,
}


def compute_metrics(task: str | GlueTask, predictions: npt.ArrayLike, references: npt.ArrayLike) -> dict[str, float]:
    """The task's GLUE metrics, keyed as the Hub's ``glue`` metric (``accuracy``, ``f1``, ...).

    ``predictions`` are class ids (scores for STS-B) or logits of shape (n, num_labels), which are
    reduced by argmax. ``references`` are the labels (class ids, or scores for STS-B).
    """
    task = get_task(task)
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.ndim == 2:
        predictions = predictions[:, 0] if task.is_regression else predictions.argmax(axis=-1)
    if predictions.ndim != 1 or predictions.shape != references.shape:
        raise ValueError(
            f"predictions and references must be 1-D and equally long, got shapes "
            f"{predictions.shape} and {references.shape}"
        )
    if not len(references):
        raise ValueError("no predictions to score")
    if task.is_regression:
        predictions, references = predictions.astype(np.float64), references.astype(np.float64)
    else:
        predictions, references = predictions.astype(np.int64), references.astype(np.int64)
        for name, values in (("predictions", predictions), ("references", references)):
            if values.min() < 0 or values.max() >= task.num_labels:
                raise ValueError(
                    f"{name} must be class ids 0..{task.num_labels - 1} for {task.name}, found "
                    f"{values.min()}..{values.max()} (-1 marks unlabelled test rows: score a validation split)"
                )
    return {metric: _METRICS[metric](predictions, references) for metric in task.metrics}


def glue_score(results: Mapping[str, Mapping[str, float]]) -> float:
    """The GLUE leaderboard's overall score: the mean over tasks of each task's mean metric.

    A task's score is the unweighted mean of its metrics (MRPC, QQP: accuracy and F1; STS-B:
    Pearson and Spearman). As on the leaderboard, MNLI is one task scored by the mean of its
    entries (pass ``"mnli_matched"`` and ``"mnli_mismatched"``), and AX is left out. Keys are task
    names or aliases; the score is on the scale of the values (the leaderboard shows x100).
    """
    scores_by_task: dict[str, list[float]] = {}
    for key, metrics in results.items():
        task = get_task(key)
        if task.name == "ax":
            continue
        missing = [metric for metric in task.metrics if metric not in metrics]
        if missing:
            raise ValueError(f"results[{key!r}] lacks {missing}; {task.name} is scored on {list(task.metrics)}")
        scores_by_task.setdefault(task.name, []).append(float(np.mean([metrics[m] for m in task.metrics])))
    if not scores_by_task:
        raise ValueError("results hold no GLUE task to score (AX is not part of the score)")
    return float(np.mean([np.mean(scores) for scores in scores_by_task.values()]))


# ------------------------------------------------------------------------ evaluation, submission


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str | GlueTask,
    split: str = "validation",
    data_dir: str | Path | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    dataset: Dataset | DatasetDict | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """The model's GLUE metrics on a labelled split (see :func:`compute_metrics`).

    The model runs in eval mode without gradients on its own device; its training mode is restored.

    Args:
        split: ``"validation"`` (MNLI: matched), ``"validation_mismatched"``, ``"train"``, ...
        data_dir: read the split from the official GLUE layout (see :func:`load_glue`);
            ``None`` loads it from the Hub.
        dataset: data to use instead: a :func:`load_glue` result, or one split of it.
        progress: show a tqdm progress bar over the batches.
    """
    task = get_task(task)
    _check_model_and_tokenizer(model, tokenizer, task)
    data = _load_split(task, split, data_dir, dataset)
    references = np.asarray(data["label"])
    if (references == -1).any():
        raise ValueError(
            f"split {split!r} of {task.name} has unlabelled rows (label -1): GLUE test labels are hidden; "
            f"evaluate on a validation split, or write a submission with predict()"
        )
    predictions = _run_model(model, tokenizer, task, data, batch_size, max_length, f"{task.name} {split}", progress)
    return compute_metrics(task, predictions, references)


def predict(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str | GlueTask,
    output_dir: str | Path,
    data_dir: str | Path | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    dataset: DatasetDict | None = None,
    progress: bool = True,
) -> list[Path]:
    """Predict the test split(s) and write the GLUE submission file(s) into ``output_dir``.

    Each file (``RTE.tsv``; MNLI: ``MNLI-m.tsv`` and ``MNLI-mm.tsv``; ``AX.tsv`` from an MNLI model)
    has the header ``index<TAB>prediction`` and one row per test example in ``idx`` order, holding
    the label as the server reads it (``entailment``, ``0``/``1``, an STS-B score in [0, 5], ...).
    Files are written atomically. ``data_dir``, ``dataset`` and ``progress`` are as in :func:`evaluate`.
    Returns the paths written.
    """
    task = get_task(task)
    if isinstance(dataset, Dataset):
        raise TypeError("predict reads the test split(s) itself: pass the DatasetDict from load_glue as dataset")
    _check_model_and_tokenizer(model, tokenizer, task)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, file_name in task.submission_files.items():
        data = _load_split(task, split, data_dir, dataset)
        predictions = _run_model(model, tokenizer, task, data, batch_size, max_length, f"{task.name} {split}", progress)
        indices = np.asarray(data["idx"])
        lines = ["index\tprediction"] + [
            f"{indices[row]}\t{task.format_prediction(predictions[row])}" for row in np.argsort(indices, kind="stable")
        ]
        text = "\n".join(lines) + "\n"  # "\n" line ends on every platform, as the GLUE server's files have
        paths.append(_io.atomic_write(output_dir / file_name, lambda path: path.write_bytes(text.encode("utf-8"))))
    return paths


def _check_model_and_tokenizer(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: GlueTask) -> None:
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels is not None and num_labels != task.num_labels:
        raise ValueError(
            f"{task.name} needs a model with num_labels={task.num_labels}, but model.config.num_labels is "
            f"{num_labels}; load it with num_labels={task.num_labels}, e.g. "
            f"AutoModelForSequenceClassification.from_pretrained(name, num_labels={task.num_labels})"
        )
    if tokenizer.pad_token is None:
        raise ValueError(
            "the tokenizer has no padding token, needed to batch examples; set one, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token and model.config.pad_token_id = tokenizer.pad_token_id"
        )


def _load_split(
    task: GlueTask, split: str, data_dir: str | Path | None, dataset: Dataset | DatasetDict | None
) -> Dataset:
    if isinstance(dataset, Dataset):
        return dataset
    available = list(dataset if dataset is not None else task.split_files)
    if split not in available and split == "validation" and "validation_matched" in available:
        split = "validation_matched"
    if split not in available:
        raise ValueError(f"{task.name} has no split {split!r}; available splits: {', '.join(available)}")
    if dataset is not None:
        return dataset[split]
    if data_dir is not None:
        return _read_tsv_split(task, Path(data_dir), split)
    return load_glue(task)[split]


def _run_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: GlueTask,
    data: Dataset,
    batch_size: int,
    max_length: int,
    desc: str,
    progress: bool,
) -> np.ndarray:
    """Class ids (argmax of the logits), or the single output for regression, in dataset order."""
    if not len(data):
        raise ValueError(f"{desc}: no examples to run the model on")
    tokenized = tokenize_glue(data, tokenizer, task, max_length)
    inputs = tokenized.select_columns([c for c in tokenized.column_names if c in tokenizer.model_input_names])
    loader = DataLoader(inputs, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batch_logits = []
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc, disable=not progress):
                logits = getattr(model(**batch.to(device)), "logits", None)
                if logits is None:
                    raise TypeError(
                        "the model's output has no `logits`: GLUE needs a sequence-classification model, "
                        "e.g. AutoModelForSequenceClassification.from_pretrained(name, "
                        f"num_labels={task.num_labels})"
                    )
                if logits.shape[-1] != task.num_labels:
                    raise ValueError(
                        f"the model outputs {logits.shape[-1]} logits per example but {task.name} needs "
                        f"{task.num_labels}; load it with num_labels={task.num_labels}"
                    )
                batch_logits.append(logits.float().cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(batch_logits)
    return (logits[:, 0] if task.is_regression else logits.argmax(dim=-1)).numpy()

