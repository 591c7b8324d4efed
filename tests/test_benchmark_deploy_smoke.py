"""Smoke run of benchmarks/deploy.py --quick: exports, ONNX Runtime sessions, every measurement, the tables.

A tiny random BERT, no downloads. The peers (peft LoRA, the AdapterHub adapter) run where their
libraries are installed and are skipped with a note where they are not (the main environment).
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

DEPLOY = Path(__file__).resolve().parents[1] / "benchmarks" / "deploy.py"


@pytest.fixture(scope="module")
def deploy():
    spec = importlib.util.spec_from_file_location("spartan_benchmark_deploy", DEPLOY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # the benchmark sets its own
    sys.modules.pop(spec.name, None)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(deploy, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")
    assert deploy.main(["--quick", "--model", "bert-base", "--no-plot", "--out", str(out)]) == 0
    return json.loads((out / "deploy_bert-base.json").read_text()), (out / "deploy_bert-base.md").read_text()


def test_every_method_is_timed_at_every_shape_against_its_baseline(deploy, quick_run):
    results, _ = quick_run
    methods = results["methods"]
    assert {"bare", "bare_copy", "spartan", "bare_int8", "spartan_int8"} <= set(methods)
    for library, names in (("peft", ("lora_merged", "lora")), ("adapters", ("seq_bn",))):
        if not deploy.common.library_available(library):
            assert not set(names) & set(methods)
            assert any(f"`{library}` package is not installed" in note for note in results["notes"])
    assert methods["spartan"]["baseline"] == "bare" and methods["spartan_int8"]["baseline"] == "bare_int8"
    # the bare graphs again without SkipLayerNormalization fusion, each against its own default session
    assert methods["bare_no_fusion"]["baseline"] == "bare" and methods["bare_int8_no_fusion"]["baseline"] == "bare_int8"
    assert methods["bare_no_fusion"]["ort_vs_eager_max_abs"] <= 1e-4
    for name, method in methods.items():
        assert set(method["time"]) == {"b1x128", "b1x32", "b32x128"}, name
        for timing in method["time"].values():
            assert finite(timing["median_s"]) and timing["median_s"] > 0
            assert finite(timing["ratio"]) and all(finite(r) for r in timing["ratio_ci95"])
            assert len(timing["times_s"]) == results["repeats"] == 2
        assert finite(method["time"]["b32x128"]["sequences_per_s"])
        baseline = methods[method["baseline"]]["time"]["b1x128"]
        if name == method["baseline"]:
            assert baseline["ratio"] == 1.0
    assert 0 <= methods["spartan"]["ort_vs_eager_max_abs"] <= 1e-4  # the random memories make this a real check
    assert finite(methods["spartan_int8"]["int8_vs_eager_max_abs"])


def test_storage_add_task_and_switch_are_measured(quick_run):
    results, _ = quick_run
    storage = results["storage"]
    spartan_row = storage["spartan"]
    assert spartan_row["shared_bytes"] == results["methods"]["spartan"]["graph_bytes"] > 0
    assert 0 < spartan_row["per_task_bytes"] < spartan_row["shared_bytes"]
    assert spartan_row["total_bytes"]["100"] == spartan_row["shared_bytes"] + 100 * spartan_row["per_task_bytes"]
    assert storage["spartan_int8"]["shared_bytes"] < spartan_row["shared_bytes"]
    for row in storage.values():
        if row["total_bytes"] is not None:
            assert all(finite(row["total_bytes"][str(n)]) for n in (1, 10, 100))
    add = results["add_task"]
    assert finite(add["median_s"]) and add["median_s"] > 0 and add["tasks_after"] == 2 + len(add["times_s"])
    for shape in ("b1x128", "b1x32"):
        switch = results["switch"][shape]
        for key in ("same_task_median_s", "switch_median_s", "extra_median_s"):
            assert finite(switch[key]), key
        assert all(finite(v) for v in switch["extra_ci95_s"])


def test_targets_and_tables_are_reported(quick_run):
    results, table = quick_run
    targets = {t["target"]: t for t in results["targets"]}
    assert len(targets) == 8
    assert targets["spartan fp32 ORT vs eager logits"]["met"] is True
    latency = [t for name, t in targets.items() if "(the faster of its two sessions)" in name]
    assert len(latency) == 2  # fp32 and int8, each read against the faster of its two bare sessions
    assert all("against the slower bare backbone" in t["note"] and "read against the faster bare session here: bare "
               "backbone" in t["note"] for t in latency)
    accuracy = [t for name, t in targets.items() if "accuracy" in name]
    assert [t["met"] for t in accuracy] == [None, None] and "skipped" in results["accuracy"]
    assert all(t["met"] in (True, False) for name, t in targets.items() if "accuracy" not in name)
    assert results["command"].startswith("python benchmarks/deploy.py --quick") and results["date"]
    for heading in ("## Latency and throughput", "## Storage on disk", "## Adding and switching tasks",
                    "## Accuracy, int8 against fp32", "## Targets"):
        assert heading in table
    assert "| bare backbone, 2nd export (A/A) | fp32 | bare |" in table
    assert "Not measured: no --sst2-checkpoint" in table


def test_accuracy_options_are_checked_before_anything_runs(deploy, tmp_path, capsys):
    with pytest.raises(SystemExit):
        deploy.parse_args(["--sst2-checkpoint", str(tmp_path / "missing")])
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        deploy.parse_args(["--sst2-checkpoint", str(tmp_path)])
    assert "needs --data-dir" in capsys.readouterr().err
    assert deploy.parse_args(["--quick", "--sst2-checkpoint", str(tmp_path)]).accuracy_skipped.startswith("--quick")
