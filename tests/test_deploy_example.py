"""examples/deploy_onnx.py end to end: a tiny BERT fine-tuned on the SST-2 and MRPC fixtures with
examples/glue_finetune.py, deployed as one ONNX backbone and two task files, evaluated on ONNX Runtime."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import spartan  # noqa: E402
from tests.tiny_models import save_tiny_bert_for_fixtures  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "glue"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def deploy():
    return load_example("deploy_onnx")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders of one-epoch spartan runs on the SST-2 and MRPC fixtures with a tiny BERT whose
    word-piece vocabulary is every word of the fixtures."""
    root = tmp_path_factory.mktemp("deploy-runs")
    folder = save_tiny_bert_for_fixtures(root / "tiny-bert", FIXTURES)
    finetune = load_example("glue_finetune")
    for task in ("sst2", "mrpc"):
        finetune.main(["--task", task, "--model", str(folder), "--data-dir", str(FIXTURES), "--output-dir",
                       str(root / task), "--epochs", "1", "--batch-size", "2", "--num-parents", "4", "--top-k", "2",
                       "--no-progress"])
    return root


def error_line(capsys) -> str:
    """The one error line a failed run printed (argparse's parser.error: the usage, then the error)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "error: " in line]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    assert lines[0].startswith("deploy_onnx.py: error: ")
    return lines[0]


def test_one_backbone_many_tasks_same_predictions_as_eager(deploy, runs, tmp_path, capsys):
    output = tmp_path / "deploy"
    report = deploy.main([
        "--checkpoint", str(runs / "sst2" / "best"), "--checkpoint", str(runs / "mrpc" / "best"),
        "--data-dir", str(FIXTURES), "--output-dir", str(output), "--int8", "--latency-calls", "2", "--no-progress",
    ])
    assert json.loads((output / "deploy_report.json").read_text()) == report

    # one backbone graph per precision, one small task folder per checkpoint
    assert sorted(p.name for p in output.glob("*.onnx")) == ["backbone.int8.onnx", "backbone.onnx"]
    assert sorted(p.name for p in (output / "tasks").iterdir()) == ["mrpc", "sst2"]
    sizes = report["sizes"]
    graphs = ("backbone.onnx", "backbone.int8.onnx")
    assert sizes["backbone"] == {name: (output / name).stat().st_size for name in graphs}
    for name in ("sst2", "mrpc"):
        assert sizes["tasks"][name] == sum(f.stat().st_size for f in (output / "tasks" / name).iterdir())
        assert 0 < sizes["tasks"][name] < sizes["backbone"]["backbone.onnx"]
    assert sizes["total"] >= sum(sizes["backbone"].values()) + sum(sizes["tasks"].values())

    for name, metrics in [("sst2", {"accuracy"}), ("mrpc", {"accuracy", "f1"})]:
        result = report["tasks"][name]
        assert result["glue_task"] == name and result["dev_examples"] == 3 and result["max_length"] == 128
        assert set(result["pytorch"]) == metrics and set(result["onnx"]) == {"fp32", "int8"}
        assert result["onnx"]["fp32"] == result["pytorch"]  # the same predictions, so the same metric
        assert result["same_predictions"]["fp32"] == 1.0 and result["max_abs_logit_difference"]["fp32"] < 1e-4
        assert 0 <= result["onnx"]["int8"][result["main_metric"]] <= 1
        latency = result["latency_ms"]
        assert latency["tokens"]["padded"] == 128 and 3 <= latency["tokens"]["real_length"] < 128
        for label in ("pytorch", "fp32", "int8"):
            assert latency[label]["real_length"] > 0 and latency[label]["padded"] > 0

    # the eager metric is the checkpoint's own: glue.evaluate of the memory loaded on a fresh backbone
    model_path = json.loads((runs / "sst2" / "run.json").read_text())["model"]
    model = spartan.load_memory(AutoModelForSequenceClassification.from_pretrained(model_path), runs / "sst2" / "best")
    expected = spartan.glue.evaluate(model, AutoTokenizer.from_pretrained(model_path), "sst2", data_dir=FIXTURES,
                                     progress=False)
    assert report["tasks"]["sst2"]["pytorch"] == pytest.approx(expected)

    # the folder serves a mixed batch on ONNX Runtime
    runtime = spartan.OnnxRuntimeModel(output, graph="fp32")
    assert runtime.tasks == ["sst2", "mrpc"] and runtime.num_labels("mrpc") == 2
    logits = runtime(["sst2", "mrpc"], input_ids=np.array([[2, 7, 3], [2, 9, 3]]))
    assert logits.shape == (2, 2) and np.isfinite(logits).all()
    out = capsys.readouterr().out
    assert "sst2: accuracy on 3 dev examples" in out and "onnx int8" in out and "total" in out


def test_errors_are_one_line(deploy, runs, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(runs / "sst2" / "best", bare)  # a checkpoint with no run.json beside it
    common = ["--data-dir", str(FIXTURES), "--output-dir", str(tmp_path / "out")]
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], "does not exist"),
        (["--checkpoint", str(bare)], "has no run.json beside it to name its task: pass --task"),
        (["--checkpoint", str(bare), "--task", "glue-ish"], "unknown GLUE task 'glue-ish'"),
        (["--checkpoint", str(bare), "--task", "mnli"], "has a head of 2 outputs but mnli has 3"),
        (["--checkpoint", str(runs / "sst2" / "best"), "--checkpoint", str(bare), "--task", "sst2"],
         "--task names the task of a single checkpoint"),
        (["--checkpoint", str(runs / "sst2" / "best"), "--checkpoint", str(runs / "sst2" / "best")],
         "several checkpoints are for sst2"),
        (["--checkpoint", str(runs / "sst2" / "best"), "--batch-size", "0"], "--batch-size must be an integer >= 1"),
    ]
    for options, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            deploy.main([*options, *common])
        assert exit_info.value.code == 2
        assert message in error_line(capsys)
    with pytest.raises(SystemExit):
        deploy.main(["--checkpoint", str(runs / "sst2" / "best"), "--data-dir", str(tmp_path),
                     "--output-dir", str(tmp_path / "out")])
    line = error_line(capsys)
    assert f"--data-dir {tmp_path}: " in line and "SST-2/" in line and "not found" in line
    assert not (tmp_path / "out").exists()  # nothing exported
