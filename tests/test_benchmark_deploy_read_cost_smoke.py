"""Smoke run of benchmarks/deploy_read_cost.py --quick: the graph cut, every read way checked and timed, the tables.

A tiny random BERT, no downloads; the figures mean nothing about speed.
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

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "deploy_read_cost.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("spartan_benchmark_read_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        out = tmp_path_factory.mktemp("read_cost")
        assert module.main(["--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets its own
        sys.modules.pop(spec.name, None)
    return json.loads((out / "deploy_read_cost.json").read_text()), (out / "deploy_read_cost.md").read_text()


def test_the_graph_is_timed_with_and_without_its_reads(quick_run):
    results, table = quick_run
    graph = results["graph"]
    assert set(graph["times"]) == {"bare", "bare_no_fusion", "spartan", "spartan_no_reads"}
    assert graph["nodes_removed"] > graph["layers"]  # at least the Add and a matrix product per layer
    for timing in graph["times"].values():
        assert len(timing["times_s"]) == results["graph_rounds"] == 3
        assert all(math.isfinite(timing["vs"][base]["ratio"]) for base in ("bare", "bare_no_fusion"))
    assert graph["cut_check_max_abs"] <= 1e-5  # with zero values the cut changes nothing: it cut the reads alone
    assert "| the same graph with its memory reads cut out |" in table


def test_every_read_way_matches_the_library_before_it_is_timed(quick_run):
    results, table = quick_run
    reads = results["reads"]["times"]
    assert set(reads) == {"library", "parent_major", "masked_parents", "rank_select", "rank_select_child_major",
                          "empty"}
    assert reads["empty"]["max_abs_difference"] is None
    assert all(0 <= t["max_abs_difference"] <= 1e-5 for name, t in reads.items() if name != "empty")
    assert reads["library"]["ratio"] == 1.0
    assert "| rank_select |" in table
