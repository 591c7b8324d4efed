"""The memory layer alone: time and peak memory of the dense and sparse paths, next to a BERT-base layer.

    python benchmarks/memory_layer.py                      # the full sweep, 48 to 1,048,576 slots
    python benchmarks/memory_layer.py --max-slots 4096     # a quick look

Tokens: batch 32 x 128 at hidden size 768 (BERT-base), 2 threads. Each row times the dense path,
the sparse path and one BERT-base layer in interleaved rounds (medians), and measures the peak
resident memory each call adds (Linux: VmHWM reset through /proc/self/clear_refs; the script
re-runs itself with MALLOC_MMAP_THRESHOLD_ set, so that freed tensors go back to the system and
each call's peak shows in the resident set instead of hiding in recycled heap).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, when run as a script
import common  # noqa: E402

from spartan import SparseHierarchicalMemory  # noqa: E402
from spartan._io import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SLOT_COUNTS = [48, 1024, 4096, 16384, 65536, 262144, 1048576]


def memory_shape(slots: int, top_k: int) -> tuple[int, int]:
    """Parents and children per parent for a memory of ``slots`` cells: the paper's 16 x 3 at 48
    slots, otherwise P near sqrt(top_k * slots), which keeps P + top_k * C (the sparse path's
    keys per token) smallest."""
    if slots == 48:
        return 16, 3
    parents = 2 ** round(math.log2(math.sqrt(top_k * slots)))
    return parents, slots // parents


def forward_backward(module: torch.nn.Module, hidden: torch.Tensor):
    def run():
        module.zero_grad(set_to_none=True)
        out = module(hidden)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()

    return run


def forward_only(module: torch.nn.Module, hidden: torch.Tensor):
    def run():
        with torch.no_grad():
            module(hidden)

    return run


def matmul_floor(memory: SparseHierarchicalMemory, hidden: torch.Tensor):
    """Only the dense path's two matrix products (score all P + P*C keys, mix the P*C values): the
    floor any dense implementation pays."""
    tokens = hidden.reshape(-1, memory.hidden_size)
    keys = torch.cat([memory.parent_keys, memory.child_keys.flatten(0, 1)]).detach()  # [P + P*C, H]
    values = memory.child_values.flatten(0, 1).detach()  # [P*C, H]
    slot_weights = torch.rand(len(tokens), len(values))

    def run():
        with torch.no_grad():
            tokens @ keys.T
            slot_weights @ values

    return run


def measure(slots: int, args: argparse.Namespace, bert_layer: torch.nn.Module, hidden: torch.Tensor) -> dict:
    parents, children = memory_shape(slots, args.top_k)
    tokens = hidden.shape[0] * hidden.shape[1]
    row = {"slots": slots, "parents": parents, "children": children, "top_k": args.top_k}
    memories = {}
    for implementation in ("dense", "sparse"):
        dense_bytes = 4 * tokens * slots * 5  # logits, child weights, slot weights and their gradients
        if implementation == "dense" and dense_bytes > args.dense_limit_gib * 2**30:
            row[implementation] = f"skipped: needs ~{dense_bytes / 2**30:.0f} GiB"
            continue
        torch.manual_seed(0)
        memories[implementation] = SparseHierarchicalMemory(
            768, parents, children, args.top_k, 1.6, value_init="normal", implementation=implementation
        )
    trainable_hidden = hidden.detach().requires_grad_(True)
    repeats = args.repeats if slots <= 65536 else max(1, args.repeats // 3)
    for mode, make in (("forward", forward_only), ("forward_backward", forward_backward)):
        bert_layer.train(mode == "forward_backward")  # no dropout at inference
        calls = {"bert_layer": make(bert_layer, trainable_hidden if mode != "forward" else hidden)}
        calls |= {
            name: make(memory, trainable_hidden if mode != "forward" else hidden) for name, memory in memories.items()
        }
        if mode == "forward" and "dense" in memories:
            calls["dense_matmuls"] = matmul_floor(memories["dense"], hidden)
        timings = common.interleaved_timings(calls, "bert_layer", repeats)
        for name, timing in timings.items():
            entry = row.setdefault(name, {})
            entry[f"{mode}_ms"] = 1000 * timing["median_s"]
            if name != "bert_layer":
                entry[f"{mode}_vs_bert_layer"] = timing["ratio"]
            if name not in ("bert_layer", "dense_matmuls"):
                entry[f"{mode}_peak_mib"] = common.peak_added_bytes(calls[name]) / 2**20
    for memory in memories.values():
        memory.zero_grad(set_to_none=True)
    return row


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Memory layer alone on {args.batch} x {args.length} tokens at H=768, top-k {args.top_k}, "
        f"{args.threads} threads; time as % of one BERT-base layer on the same input (median over interleaved rounds "
        f"of the ratio in each round, {args.repeats} rounds); peak = resident memory the call adds. The BERT layer "
        f"runs in eval mode for the forward rows and in train mode (dropout) for fwd+bwd. The sparse path's fwd+bwd "
        f"peak includes the dense gradients of its parameters ([P, C, H] each for keys and values), which grow with "
        f"P x C.",
        "",
        (
            "| slots (P x C) | path | forward ms | % of BERT layer | fwd+bwd ms | % of BERT layer | fwd peak MiB "
            "| fwd+bwd peak MiB |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        shape = f"{row['slots']:,} ({row['parents']} x {row['children']})"
        for path in ("dense", "sparse"):
            entry = row.get(path)
            if isinstance(entry, str):
                lines.append(f"| {shape} | {path} | {entry} | | | | | |")
                continue
            lines.append(
                f"| {shape} | {path} | {entry['forward_ms']:.2f} | {100 * entry['forward_vs_bert_layer']:.2f}% "
                f"| {entry['forward_backward_ms']:.2f} | {100 * entry['forward_backward_vs_bert_layer']:.2f}% "
                f"| {entry['forward_peak_mib']:.1f} | {entry['forward_backward_peak_mib']:.1f} |"
            )
    floors = [
        f"{row['slots']:,} slots {row['dense_matmuls']['forward_ms']:.2f} ms = "
        f"{100 * row['dense_matmuls']['forward_vs_bert_layer']:.2f}%"
        for row in rows
        if "dense_matmuls" in row
    ]
    lines += [
        "",
        "The dense path's two matrix products alone (forward, the floor of a dense read): " + "; ".join(floors) + ".",
    ]
    bert = rows[0]["bert_layer"]
    lines += [
        "",
        (
            f"One BERT-base layer: forward {bert['forward_ms']:.1f} ms, fwd+bwd {bert['forward_backward_ms']:.1f} ms "
            "(first row's run)."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-slots", type=int, default=SLOT_COUNTS[-1])
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dense-limit-gib", type=float, default=4.0, help="skip dense runs needing more")
    parser.add_argument("--output", type=Path, default=RESULTS / "memory_layer")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bert_layer = BertLayer(BertConfig())
    hidden = torch.randn(args.batch, args.length, 768)
    rows = []
    for slots in tqdm([s for s in SLOT_COUNTS if s <= args.max_slots], desc="memory sizes"):
        rows.append(measure(slots, args, bert_layer, hidden))
        tqdm.write(json.dumps(rows[-1]))
    table = markdown(rows, args)
    print(table)
    atomic_write_text(args.output.with_suffix(".md"), table)
    atomic_write_text(args.output.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
