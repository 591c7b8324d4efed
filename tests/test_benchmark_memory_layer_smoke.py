"""Smoke run of benchmarks/memory_layer.py --quick: every variant measured in a worker process, the JSON
fields and tables, the memory planner's "does not fit" rows, and its command-line errors.

Tiny sizes (H=64, 2 x 16 tokens, 48 to 4,096 slots, 2 rounds, 1 thread). product-key-memory is not
installed in the main environment: its rows are then skipped with a note.
"""

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_layer.py"
SPARTAN_READS = ("dense", "sparse", "product", "product_dense_grads")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("spartan_benchmark_memory_layer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    output = tmp_path_factory.mktemp("memory_layer") / "large"
    assert bench.main(["--quick", "--threads", "1", "--output", str(output)]) == 0
    return json.loads(output.with_suffix(".json").read_text()), output.with_suffix(".md").read_text()


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rows_by_key(results):
    return {(row["slots"], row["variant"]): row for row in results["rows"]}


def test_every_spartan_read_is_timed_against_the_layer_and_its_floor(quick_run):
    results, _ = quick_run
    rows = rows_by_key(results)
    tokens = results["settings"]["batch"] * results["settings"]["length"]
    for slots in (48, 1024, 4096):
        for variant in SPARTAN_READS:
            row = rows[slots, variant]
            assert row["status"] == "measured", row
            forward, backward, floor = row["forward"], row["forward_backward"], row["floor"]
            for entry in (forward, backward):
                assert finite(entry["ms"]) and entry["ms"] > 0
                assert entry["us_per_token"] == pytest.approx(1000 * entry["ms"] / tokens)
                assert finite(entry["vs_bert_layer"]) and all(finite(r) for r in entry["vs_bert_layer_ci95"])
                assert len(entry["times_s"]) == results["settings"]["rounds"] == 2
                assert finite(entry["peak_mib"])
            assert finite(forward["vs_floor"]) and forward["vs_floor"] > 0
            assert backward["vs_own_forward"] == pytest.approx(backward["ms"] / forward["ms"])
            assert finite(backward["peak_beyond_gradients_mib"])
            assert floor["mm"][:2] == [tokens, results["settings"]["hidden"]]
            assert floor["mm"][2] * results["settings"]["hidden"] >= floor["macs_per_token"] > 0
            assert finite(floor["ms"]) and finite(floor["gflops"])
            assert row["parameters"] > 0 and finite(row["bert_layer"]["forward_ms"])
            if variant != "dense":
                # the sparse reads: the rows they touch gathered alone, top-k x C per token of both tables
                traffic = row["traffic_floor"]
                assert traffic["rows"] == 2 * tokens * results["settings"]["top_k"] * row["spec"]["children"]
                assert 0 < traffic["distinct_rows"] <= min(traffic["rows"], 2 * slots)
                assert traffic["distinct_bytes"] == traffic["distinct_rows"] * results["settings"]["hidden"] * 4
                assert finite(traffic["ms"]) and finite(forward["vs_traffic_floor"])
            else:
                assert "traffic_floor" not in row and "vs_traffic_floor" not in forward


def test_gradient_bytes_are_the_full_tables_for_dense_gradients_and_the_rows_read_for_sparse(quick_run):
    results, _ = quick_run
    rows = rows_by_key(results)
    hidden = results["settings"]["hidden"]
    table = 4096 * hidden * 4  # [P*C, H] fp32
    dense_grads = rows[4096, "product_dense_grads"]["forward_backward"]["gradient_bytes_by_parameter"]
    sparse_grads = rows[4096, "product"]["forward_backward"]["gradient_bytes_by_parameter"]
    assert dense_grads["values"] == dense_grads["keys"] == table
    assert set(sparse_grads) == set(dense_grads) == {"keys", "values", "sub_keys"}
    assert 0 < sparse_grads["values"] < table  # 32 tokens x 8 parents x 16 children read fewer rows than 4,096
    flat = rows[4096, "sparse"]["forward_backward"]
    assert flat["gradient_bytes"] == rows[4096, "sparse"]["parameter_bytes"]  # dense gradients of every parameter


def test_training_steps_report_time_gradients_and_optimizer_state(quick_run):
    results, _ = quick_run
    rows = rows_by_key(results)
    for variant, optimizer in (("step_adamw", "AdamW"), ("step_lazyadamw", "LazyAdamW")):
        row = rows[4096, variant]
        assert row["status"] == "measured"
        step = row["step"]
        assert step["optimizer"] == optimizer
        assert finite(step["ms"]) and finite(step["vs_bert_layer_forward_backward"]) and finite(step["peak_mib"])
        assert step["optimizer_state_bytes"] >= 2 * row["parameter_bytes"]  # both moments of every parameter
        assert step["gradient_bytes"] > 0
    assert (rows[4096, "step_lazyadamw"]["step"]["gradient_bytes"]
            < rows[4096, "step_adamw"]["step"]["gradient_bytes"])


def test_product_key_memory_rows_run_or_are_skipped_with_a_note(bench, quick_run):
    results, _ = quick_run
    rows = rows_by_key(results)
    installed = importlib.util.find_spec("product_key_memory") is not None
    for slots in (1024, 4096):
        row = rows[slots, "pkm"]
        if installed:
            assert row["status"] == "measured" and finite(row["forward_backward"]["ms"])
            assert finite(rows[slots, "product"]["forward_backward"]["vs_pkm"])
        else:
            assert row["status"] == "skipped" and "not installed" in row["note"]
    if not installed:
        assert any("product-key-memory is not installed" in note for note in results["notes"])


def test_metadata_tables_and_targets(quick_run):
    results, markdown = quick_run
    meta = results["meta"]
    assert meta["command"].startswith("python benchmarks/memory_layer.py --quick")
    assert meta["date"] and meta["machine"] and meta["torch"]
    for heading in ("## Forward", "## Forward + backward", "## One training step", "## Arithmetic floors",
                    "## Memory-traffic floors", "## Targets"):
        assert heading in markdown
    assert meta["command"] in markdown
    assert len(results["targets"]) == 6
    assert {t["status"] for t in results["targets"]} == {"not measured"}  # quick sizes are not the targets'


def test_a_job_over_the_memory_budget_is_reported_with_what_it_needs(bench):
    settings = {"quick": True, "hidden": 64, "batch": 2, "length": 16, "top_k": 8,
                "threads": 1, "slots": [4096], "pkm_slots": [], "train_slots": [4096], "rounds": 2, "heavy_rounds": 2}
    args = argparse.Namespace(only=["train"], max_slots=4096, memory_gib=0.001, dense_limit_gib=4.0)
    jobs, decided = bench.plan(args, settings, pkm_available=False)
    assert jobs == []
    assert [row["variant"] for row in decided] == ["step_adamw", "step_lazyadamw"]
    for row in decided:
        assert row["status"] == "does not fit"
        assert "does not fit in 0.0 GiB" in row["note"] and "needs ~" in row["note"]
        assert row["estimated_gib"] > 0.001


@pytest.mark.parametrize("argv, message", [
    (["--slots", "5"], "--slots 5 is not in the sweep"),
    (["--only", "bogus"], "unknown ['bogus']"),
    (["--only", "pkm", "--max-slots", "4096"], "nothing to run"),
    (["--rounds", "0"], "invalid positive value"),
])
def test_bad_arguments_exit_with_one_line(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in error and message in error
