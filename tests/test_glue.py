"""spartan.glue on tiny files in the official GLUE layout and a tiny random BERT (no downloads)."""

import ast
import logging
import re
import shutil
import time
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

import spartan._io
from spartan import glue
from spartan.glue import GLUE_TASKS, compute_metrics, evaluate, get_task, glue_score, load_glue, predict, tokenize_glue

FIXTURES = Path(__file__).parent / "fixtures" / "glue"

ROW_COUNTS = {
    "cola": {"train": 4, "validation": 3, "test": 3},
    "sst2": {"train": 4, "validation": 3, "test": 3},
    "mrpc": {"train": 4, "validation": 3, "test": 2},
    "qqp": {"train": 4, "validation": 3, "test": 2},  # one malformed train row skipped
    "stsb": {"train": 4, "validation": 4, "test": 2},
    "mnli": {  # one malformed train row skipped
        "train": 4,
        "validation_matched": 3,
        "validation_mismatched": 2,
        "test_matched": 2,
        "test_mismatched": 3,
    },
    "qnli": {"train": 3, "validation": 3, "test": 2},
    "rte": {"train": 4, "validation": 4, "test": 3},
    "wnli": {"train": 3, "validation": 2, "test": 2},
    "ax": {"test": 3},
}

REFERENCE_METRICS = {  # (predictions, references) -> value, from scikit-learn and scipy
    "accuracy": lambda p, r: accuracy_score(r, p),
    "f1": lambda p, r: f1_score(r, p, zero_division=0),
    "matthews_correlation": lambda p, r: matthews_corrcoef(r, p),
    "pearson": lambda p, r: pearsonr(p, r)[0],
    "spearmanr": lambda p, r: spearmanr(p, r)[0],
}


def reference_metrics(task_name, predictions, references):
    return {metric: REFERENCE_METRICS[metric](predictions, references) for metric in get_task(task_name).metrics}


def copy_task_files(task_name, data_dir, file_names):
    folder = data_dir / GLUE_TASKS[task_name].folder
    folder.mkdir(parents=True)
    for name in file_names:
        shutil.copy(FIXTURES / folder.name / name, folder / name)
    return folder


# ------------------------------------------------------------------------------------ tasks


def test_get_task_accepts_case_and_aliases():
    assert get_task("SST-2").name == "sst2"
    assert get_task("sts-b").name == "stsb"
    assert get_task("CoLA").name == "cola"
    assert get_task("MNLI-mm").name == "mnli"
    assert get_task("mnli_matched").name == "mnli"
    assert get_task("diagnostic").name == "ax"
    assert get_task(GLUE_TASKS["rte"]) is GLUE_TASKS["rte"]


def test_unknown_task_lists_valid_names():
    with pytest.raises(
        ValueError, match="unknown GLUE task 'sst5'.*cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, ax"
    ):
        get_task("sst5")


def test_task_metadata():
    stsb, mnli, rte = GLUE_TASKS["stsb"], GLUE_TASKS["mnli"], GLUE_TASKS["rte"]
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.main_metric == "pearson"
    assert mnli.num_labels == 3 and mnli.validation_split == "validation_matched"
    assert dict(mnli.submission_files) == {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"}
    assert rte.text_fields == ("sentence1", "sentence2") and rte.validation_split == "validation"
    assert GLUE_TASKS["ax"].split_files == {"test": "diagnostic.tsv"}
    assert {task.main_metric for task in GLUE_TASKS.values()} <= {"accuracy", "f1", "matthews_correlation", "pearson"}
    assert all(task.main_metric in task.metrics for task in GLUE_TASKS.values())
    assert sorted(name for task in GLUE_TASKS.values() for name in task.submission_files.values()) == sorted(
        ["CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "QQP.tsv", "STS-B.tsv", "MNLI-m.tsv", "MNLI-mm.tsv"]
        + ["QNLI.tsv", "RTE.tsv", "WNLI.tsv", "AX.tsv"]
    )
    assert rte.format_prediction(1) == "not_entailment" and GLUE_TASKS["cola"].format_prediction(1) == "1"
    assert stsb.format_prediction(5.6) == "5.000" and stsb.format_prediction(-0.2) == "0.000"
    assert stsb.format_prediction(2.34567) == "2.346"


# ------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("task_name", list(GLUE_TASKS))
def test_load_glue_dir_columns_and_rows(task_name):
    task = GLUE_TASKS[task_name]
    data = load_glue(task_name, data_dir=FIXTURES)
    assert {split: split_data.num_rows for split, split_data in data.items()} == ROW_COUNTS[task_name]
    for split, split_data in data.items():
        assert split_data.column_names == [*task.text_fields, "label", "idx"]
        labels = np.asarray(split_data["label"])
        if split.startswith("test"):
            assert (labels == -1).all()
        elif task.is_regression:
            assert split_data.features["label"].dtype == "float32" and ((labels >= 0) & (labels <= 5)).all()
        else:
            assert split_data.features["label"].names == list(task.label_names)
            assert set(labels) <= set(range(task.num_labels))
        assert all(text for field in task.text_fields for text in split_data[field])


def test_label_ids_follow_the_hub():
    def labels(task_name, split="train"):
        return load_glue(task_name, data_dir=FIXTURES)[split]["label"]

    assert labels("cola") == [1, 0, 1, 0]
    assert labels("sst2") == [1, 0, 0, 1]
    assert labels("mrpc") == [1, 0, 1, 0]
    assert labels("qqp") == [1, 0, 1, 0]
    assert labels("mnli") == [0, 2, 1, 2]  # entailment, contradiction, neutral, contradiction
    assert labels("mnli", "validation_matched") == [0, 1, 2]
    assert labels("qnli") == [0, 1, 0]  # entailment, not_entailment, entailment
    assert labels("rte") == [0, 1, 0, 1]
    assert labels("wnli") == [1, 0, 1]
    assert labels("stsb") == pytest.approx([4.75, 0.25, 3.6, 2.0])


def test_quotes_and_bom_survive():
    mrpc = load_glue("mrpc", data_dir=FIXTURES)
    assert mrpc["train"][0]["sentence1"] == 'The mayor called the plan " a good start " on Monday .'
    assert mrpc["test"]["idx"] == [0, 1]
    assert load_glue("mnli", data_dir=FIXTURES)["train"][2]["premise"] == '"We will see," she said.'
    assert load_glue("cola", data_dir=FIXTURES)["train"][2]["sentence"] == 'She said "hello" to the new neighbours.'


def test_malformed_rows_are_skipped(caplog):
    with caplog.at_level(logging.WARNING, logger="spartan.glue"):
        qqp = load_glue("qqp", data_dir=FIXTURES)["train"]
    assert "How do I fix a flat tyre?" not in qqp["question1"]
    assert qqp["idx"] == [0, 1, 2, 3]
    assert "skipped 1 malformed row" in caplog.text
    mnli = load_glue("mnli", data_dir=FIXTURES)["train"]
    assert mnli["hypothesis"] == ["The man was outside.", "The office is closed on Mondays."] + [
        "She promised nothing.",
        "I have never seen a farm.",
    ]


def test_test_files_are_optional(tmp_path):
    copy_task_files("rte", tmp_path, ["train.tsv", "dev.tsv"])
    assert list(load_glue("rte", data_dir=tmp_path)) == ["train", "validation"]


def test_missing_file_names_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"RTE/train\.tsv not found.*official GLUE layout"):
        load_glue("rte", data_dir=tmp_path)


def test_bad_label_names_file_and_line(tmp_path):
    folder = copy_task_files("rte", tmp_path, ["train.tsv", "dev.tsv"])
    lines = (folder / "dev.tsv").read_text().splitlines()
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\tmaybe"
    (folder / "dev.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"RTE/dev\.tsv, line 3: label 'maybe'.*entailment, not_entailment"):
        load_glue("rte", data_dir=tmp_path)


def test_data_files_csv_and_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "train.csv").write_text(
        'sentence1,sentence2,label,idx\nA cat sleeps.,"An animal ""rests"".",0,0\nIt is hot.,It is cold.,1,1\n'
    )
    (tmp_path / "test.jsonl").write_text('{"sentence1": "He ran.", "sentence2": "He moved."}\n')
    data = load_glue("rte", data_files={"train": tmp_path / "train.csv", "test": tmp_path / "test.jsonl"})
    assert data["train"][0] == {"sentence1": "A cat sleeps.", "sentence2": 'An animal "rests".', "label": 0, "idx": 0}
    assert data["test"][:] == {"sentence1": ["He ran."], "sentence2": ["He moved."], "label": [-1], "idx": [0]}
    with pytest.raises(ValueError, match=r"test\.jsonl: column\(s\) \['question', 'sentence'\] missing"):
        load_glue("qnli", data_files={"test": tmp_path / "test.jsonl"})


def test_hub_failure_offline_points_to_data_dir(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no request: straight to the (patched) loader
    monkeypatch.setattr(glue, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=r"data_dir=.*DATA_DIR/RTE/train\.tsv"):
        load_glue("rte")


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The Hub at an address where nothing listens, nothing in the caches, offline mode off."""
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")


def test_unreachable_hub_fails_at_once_in_one_line(unreachable_hub, caplog):
    started = time.perf_counter()
    with caplog.at_level(logging.INFO), pytest.raises(ConnectionError) as error:
        load_glue("rte")
    assert time.perf_counter() - started < 15  # huggingface_hub's five retries with back-off take over 20 s
    assert "Retrying" not in caplog.text
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("could not load nyu-mll/glue (rte) from the Hugging Face Hub (")
    assert "pass data_dir= a folder in the official GLUE layout (e.g. DATA_DIR/RTE/train.tsv)" in message


def test_offline_mode_without_a_cache_fails_in_one_line(unreachable_hub, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match=r"^could not load nyu-mll/glue \(rte\).*OfflineModeIsEnabled.*data_dir="):
        load_glue("rte")


# ------------------------------------------------------------------------------------ model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A BERT word-piece tokenizer whose vocabulary is every word and punctuation mark of the fixtures."""
    words = set()
    for path in FIXTURES.rglob("*.tsv"):
        words.update(re.findall(r"\w+|[^\w\s]", path.read_text(encoding="utf-8-sig").lower()))
    vocab_file = tmp_path_factory.mktemp("tokenizer") / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]) + "\n")
    return BertTokenizer(str(vocab_file))  # the vocabulary file, positionally: transformers 4.x and 5.x


def tiny_bert(tokenizer, num_labels):
    torch.manual_seed(num_labels)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def manual_predictions(model, tokenizer, task_name, data):
    """One example at a time, no padding: class ids, or scores for STS-B."""
    task = get_task(task_name)
    predictions = []
    with torch.no_grad():
        for row in data:
            encoded = tokenizer(*(row[field] for field in task.text_fields), return_tensors="pt")
            logits = model.eval()(**encoded).logits[0]
            predictions.append(logits[0].item() if task.is_regression else logits.argmax().item())
    return np.array(predictions)


def test_tokenize_glue(tokenizer):
    rte = load_glue("rte", data_dir=FIXTURES)
    train = tokenize_glue(rte, tokenizer, "rte")["train"]
    assert set(train.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels", "idx"}
    assert train["labels"] == [0, 1, 0, 1]
    assert len({len(ids) for ids in train["input_ids"]}) > 1  # not padded
    truncated = tokenize_glue(rte["train"], tokenizer, "rte", max_length=12)
    assert [len(ids) for ids in truncated["input_ids"]] == [12] * 4
    stsb = tokenize_glue(load_glue("stsb", data_dir=FIXTURES)["validation"], tokenizer, "stsb")
    assert stsb.features["labels"].dtype == "float32"


@pytest.mark.parametrize(
    ("task_name", "split", "manual_split"),
    [
        ("rte", "validation", "validation"),
        ("cola", "validation", "validation"),
        ("mrpc", "validation", "validation"),
        ("mnli", "validation", "validation_matched"),
        ("mnli", "validation_mismatched", "validation_mismatched"),
        ("stsb", "validation", "validation"),
    ],
)
def test_evaluate_matches_manual_computation(tokenizer, task_name, split, manual_split):
    task = get_task(task_name)
    model = tiny_bert(tokenizer, task.num_labels).train()
    results = evaluate(model, tokenizer, task_name, split=split, data_dir=FIXTURES, batch_size=2)
    assert model.training  # mode restored
    assert list(results) == list(task.metrics)
    for metric, value in results.items():
        low = -1.0 if metric in ("matthews_correlation", "pearson", "spearmanr") else 0.0
        assert low <= value <= 1.0
    data = load_glue(task_name, data_dir=FIXTURES)[manual_split]
    predictions = manual_predictions(model, tokenizer, task_name, data)
    expected = reference_metrics(task_name, predictions, np.asarray(data["label"]))
    # Batched (padded) and one-by-one float32 outputs differ slightly; correlations of a random
    # model's near-constant scores magnify that.
    assert results == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_evaluate_and_predict_accept_loaded_data(tokenizer, tmp_path):
    model = tiny_bert(tokenizer, 2)
    data = load_glue("rte", data_dir=FIXTURES)
    from_dir = evaluate(model, tokenizer, "rte", data_dir=FIXTURES)
    assert evaluate(model, tokenizer, "rte", dataset=data) == from_dir
    assert evaluate(model, tokenizer, "rte", dataset=data["validation"]) == from_dir
    [from_files] = predict(model, tokenizer, "rte", tmp_path / "files", data_dir=FIXTURES)
    [from_data] = predict(model, tokenizer, "rte", tmp_path / "data", dataset=data)
    assert from_data.read_text() == from_files.read_text()


def test_evaluate_and_predict_show_a_progress_bar_unless_told_not_to(tokenizer, tmp_path, capsys):
    model = tiny_bert(tokenizer, 2)
    evaluate(model, tokenizer, "rte", data_dir=FIXTURES, batch_size=2)
    predict(model, tokenizer, "rte", tmp_path, data_dir=FIXTURES, batch_size=2)
    err = capsys.readouterr().err
    assert re.search(r"rte validation: 100%.* 2/2 ", err) and re.search(r"rte test: 100%.* 2/2 ", err)
    evaluate(model, tokenizer, "rte", data_dir=FIXTURES, batch_size=2, progress=False)
    predict(model, tokenizer, "rte", tmp_path, data_dir=FIXTURES, batch_size=2, progress=False)
    err = capsys.readouterr().err
    assert "rte validation" not in err and "rte test" not in err


def test_submission_files_are_written_by_the_package_atomic_writer(tokenizer, tmp_path, monkeypatch):
    written = []
    atomic_write = spartan._io.atomic_write

    def recording(target, write):
        written.append(Path(target))
        return atomic_write(target, write)

    monkeypatch.setattr(spartan._io, "atomic_write", recording)
    paths = predict(tiny_bert(tokenizer, 3), tokenizer, "mnli", tmp_path, data_dir=FIXTURES)
    assert written == paths == [tmp_path / "MNLI-m.tsv", tmp_path / "MNLI-mm.tsv"]
    assert b"\r" not in paths[0].read_bytes()


def test_glue_imports_nothing_of_the_memories():
    """glue.py works with any model: of spartan it may import the file helpers (spartan._io) alone."""
    spartan_imports = set()
    for node in ast.walk(ast.parse(Path(glue.__file__).read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:  # from . import x / from .x import y
            spartan_imports |= {node.module} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "spartan":
            spartan_imports.add(node.module)
        elif isinstance(node, ast.Import):
            spartan_imports |= {alias.name for alias in node.names if alias.name.split(".")[0] == "spartan"}
    assert spartan_imports == {"_io"}


def test_evaluate_refuses_unlabelled_split(tokenizer):
    with pytest.raises(ValueError, match="test labels are hidden.*predict"):
        evaluate(tiny_bert(tokenizer, 2), tokenizer, "rte", split="test", data_dir=FIXTURES)
    with pytest.raises(ValueError, match="no split 'dev'.*validation"):
        evaluate(tiny_bert(tokenizer, 2), tokenizer, "rte", split="dev", data_dir=FIXTURES)


def test_num_labels_mismatch(tokenizer):
    with pytest.raises(ValueError, match="load it with num_labels=3"):
        evaluate(tiny_bert(tokenizer, 2), tokenizer, "mnli", data_dir=FIXTURES)


def test_model_without_classification_head(tokenizer):
    encoder = BertModel(
        BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(TypeError, match="no `logits`.*AutoModelForSequenceClassification"):
        evaluate(encoder, tokenizer, "rte", data_dir=FIXTURES)


@pytest.mark.parametrize(
    ("task_name", "file_names"),
    [
        ("rte", ["RTE.tsv"]),
        ("cola", ["CoLA.tsv"]),
        ("qqp", ["QQP.tsv"]),
        ("stsb", ["STS-B.tsv"]),
        ("mnli", ["MNLI-m.tsv", "MNLI-mm.tsv"]),
        ("ax", ["AX.tsv"]),
    ],
)
def test_predict_writes_submission_files(tokenizer, tmp_path, task_name, file_names):
    task = get_task(task_name)
    paths = predict(tiny_bert(tokenizer, task.num_labels), tokenizer, task_name, tmp_path / "out", data_dir=FIXTURES)
    assert [path.name for path in paths] == file_names
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(file_names)  # no temporary files
    test_splits = load_glue(task_name, data_dir=FIXTURES)
    for path, split in zip(paths, task.submission_files):
        header, *rows = path.read_text().splitlines()
        assert header == "index\tprediction"
        assert len(rows) == test_splits[split].num_rows
        indices, predictions = zip(*(row.split("\t") for row in rows))
        assert [int(index) for index in indices] == sorted(test_splits[split]["idx"])
        if task.is_regression:
            assert all(0.0 <= float(value) <= 5.0 and len(value.split(".")[1]) == 3 for value in predictions)
        else:
            assert set(predictions) <= set(task.tsv_labels)


def test_predict_orders_rows_by_index(tokenizer, tmp_path):
    folder = copy_task_files("rte", tmp_path, ["train.tsv", "dev.tsv"])
    header, *rows = (FIXTURES / "RTE" / "test.tsv").read_text().splitlines()
    (folder / "test.tsv").write_text("\n".join([header, *reversed(rows)]) + "\n")
    model = tiny_bert(tokenizer, 2)
    [path] = predict(model, tokenizer, "rte", tmp_path / "out", data_dir=tmp_path, batch_size=2)
    test = load_glue("rte", data_dir=FIXTURES)["test"]
    expected = [
        f"{index}\t{('entailment', 'not_entailment')[label]}"
        for index, label in enumerate(manual_predictions(model, tokenizer, "rte", test))
    ]
    assert path.read_text().splitlines()[1:] == expected


# ---------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("task_name", ["cola", "sst2", "mrpc", "qqp", "mnli", "ax", "wnli"])
def test_classification_metrics_match_sklearn(task_name):
    rng = np.random.default_rng(0)
    num_labels = get_task(task_name).num_labels
    predictions, references = rng.integers(0, num_labels, size=(2, 300))
    results = compute_metrics(task_name, predictions, references)
    assert list(results) == list(get_task(task_name).metrics)
    assert results == pytest.approx(reference_metrics(task_name, predictions, references), abs=1e-12)
    logits = rng.normal(size=(300, num_labels))
    assert compute_metrics(task_name, logits, references) == compute_metrics(task_name, logits.argmax(-1), references)


def test_regression_metrics_match_scipy():
    rng = np.random.default_rng(0)
    references = rng.uniform(0, 5, size=200)
    predictions = references + rng.normal(scale=1.5, size=200)
    results = compute_metrics("stsb", predictions, references)
    assert list(results) == ["pearson", "spearmanr"]
    assert results == pytest.approx(reference_metrics("stsb", predictions, references), abs=1e-12)
    assert compute_metrics("stsb", predictions[:, None], references) == results


def test_degenerate_classification_metrics_match_sklearn():
    constant, references = np.zeros(6, dtype=int), np.array([0, 1, 0, 1, 1, 0])
    for task_name in ("cola", "mrpc"):
        assert compute_metrics(task_name, constant, references) == pytest.approx(
            reference_metrics(task_name, constant, references)
        )


def test_compute_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="equally long"):
        compute_metrics("rte", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="unlabelled test rows"):
        compute_metrics("rte", [0, 1], [0, -1])


def test_glue_score_hand_computed():
    results = {
        "cola": {"matthews_correlation": 0.5},
        "mrpc": {"accuracy": 0.8, "f1": 0.9, "loss": 3.0},  # extra keys are ignored
        "mnli_matched": {"accuracy": 0.8},
        "MNLI-mm": {"accuracy": 0.7},
        "ax": {"matthews_correlation": 0.1},  # not part of the score
    }
    assert glue_score(results) == pytest.approx((0.5 + 0.85 + 0.75) / 3)
    with pytest.raises(ValueError, match=r"results\['qqp'\] lacks \['f1'\]"):
        glue_score({"qqp": {"accuracy": 0.9}})


def test_glue_score_reproduces_the_leaderboard():
    """BERT-large's row on gluebenchmark.com, whose overall score is 80.5."""
    bert_large = {
        "cola": {"matthews_correlation": 60.5},
        "sst2": {"accuracy": 94.9},
        "mrpc": {"f1": 89.3, "accuracy": 85.4},
        "stsb": {"pearson": 87.6, "spearmanr": 86.5},
        "qqp": {"f1": 72.1, "accuracy": 89.3},
        "mnli-m": {"accuracy": 86.7},
        "mnli-mm": {"accuracy": 85.9},
        "qnli": {"accuracy": 92.7},
        "rte": {"accuracy": 70.1},
        "wnli": {"accuracy": 65.1},
        "ax": {"matthews_correlation": 39.6},
    }
    assert round(glue_score(bert_large), 1) == 80.5
