"""Smoke run of benchmarks/speed.py --quick: the CLI, the tables and one peak-memory worker.

Only the methods the environment has run (bare, spartan, full fine-tuning in the main one); the
peers (AdapterHub ``adapters``, ``peft``) are skipped with a message when they are not installed.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("tqdm")

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("spartan_benchmark_speed", SPEED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # the benchmark sets its own


def test_quick_run_writes_tables_and_skips_missing_peers(speed, tmp_path, capsys):
    argv = ["--quick", "--model", "bert-base", "--repeats", "1", "--warmup", "0", "--no-memory", "--out", str(tmp_path)]
    assert speed.main(argv) == 0
    printed = capsys.readouterr().out
    for library, method in (("adapters", "seq_bn"), ("peft", "lora")):
        if not speed.common.library_available(library):
            assert f"`{library}` package is not installed" in printed and method in printed

    results = json.loads((tmp_path / "speed_bert-base.json").read_text())
    methods = results["methods"]
    assert {"bare", "spartan", "full"} <= set(methods)
    assert methods["bare"]["time"]["infer_b32"]["ratio"] == 1.0
    assert set(methods["spartan"]["time"]) == {"infer_b32", "infer_b1", "train"}
    assert set(methods["full"]["time"]) == {"train"}  # training figures only
    assert 0 < methods["bare"]["trainable_params"] < methods["spartan"]["trainable_params"]
    assert methods["spartan"]["trainable_params"] < methods["full"]["trainable_params"]
    assert 0 < methods["spartan"]["checkpoint"]["bytes"] < methods["full"]["checkpoint"]["bytes"]
    table = (tmp_path / "speed_bert-base.md").read_text()
    assert "| spartan 16x3 top-8 |" in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "speed_bert-base.png").stat().st_size > 0


def test_peak_memory_worker_runs_in_a_fresh_process(speed):
    args = speed.parse_args(["--quick"])
    result = speed.run_worker("bert-base", "spartan", "train", args)
    assert "error" not in result, result
    assert result["peak_rss"] >= result["rss_after_build"] > 0
