"""Where spartan's exported latency goes on ONNX Runtime: the graph with and without its memory reads, and
the memory read alone written in other ways.

    .venv-bench/bin/python benchmarks/deploy_read_cost.py        # MiniLM, results/deploy_read_cost.{md,json}
    python benchmarks/deploy_read_cost.py --quick --out /tmp/rc  # smoke run: a tiny random BERT, 3 rounds

Part 1, the whole graph at batch 1 (interleaved rounds, medians, per-round ratios with 95% bootstrap
intervals, ``deploy.py``'s session settings): the bare export with ONNX Runtime's default optimisations and
with ``SkipLayerNormFusion`` off, ``spartan.export_onnx``'s graph (one task's tensors fed, the session
called directly, without ``OnnxRuntimeModel``'s Python), and the same graph with every memory read cut
out (each layer's ``residual + read`` replaced by the residual, the nodes that fed only the read
removed): what is left costs what the per-row norms and head and the task inputs cost.

Part 2, one memory read alone on ``[1, L, H]`` tokens (the default ``SpartanConfig``'s shape, the
backbone's H), each way exported with ``torch.onnx.export(dynamo=True)`` and checked against
``spartan.memory.dense_read`` (max |difference| <= 1e-5) before it is timed:

- ``library``: ``dense_read`` as the exported graph runs it (children child-major, softmax over them
  along dim -2; top-k parents by TopK, their weights scattered into a [P] row);
- ``parent_major``: children stored parent-major, softmax along the last dim;
- ``masked_parents``: parent-major, and the parents' softmax taken over all P with the unselected
  masked to -inf (TopK only for the k-th value);
- ``rank_select``: parent-major, the top-k parents found by counting, for each parent, the parents
  ahead of it (ties by index, as ONNX TopK orders them): no TopK;
- ``rank_select_child_major``: the same selection with the library's child-major layout;
- ``empty``: a graph that only adds its inputs' first rows times 0 to the tokens: the cost of a call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py and deploy.py, when run as a script
import common  # noqa: E402
import deploy  # noqa: E402

import spartan  # noqa: E402
from spartan import _validate  # noqa: E402
from spartan._io import atomic_write_text  # noqa: E402
from spartan.memory import dense_read  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAX_READ_DIFFERENCE = 1e-5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", choices=list(common.BACKBONES))
    parser.add_argument("--length", type=int, default=None, help="tokens per row (default 128; 16 with --quick)")
    parser.add_argument("--graph-rounds", type=int, default=None, help="timed rounds of part 1 (default 300)")
    parser.add_argument("--read-rounds", type=int, default=None, help="timed rounds of part 2 (default 2000)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--quick", action="store_true", help="a tiny random BERT, 3 rounds: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for deploy_read_cost.{md,json}")
    args = parser.parse_args(argv)
    quick_or_full = {"length": (16, 128), "graph_rounds": (3, 300), "read_rounds": (3, 2000)}
    for name, (quick, full) in quick_or_full.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    try:
        for name in ("length", "graph_rounds", "read_rounds", "threads"):
            setattr(args, name, _validate.positive_int(f"--{name.replace('_', '-')}", getattr(args, name)))
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/deploy_read_cost.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    for library in ("onnxruntime", "onnxscript", "onnx"):
        if not common.library_available(library):
            sys.exit(f"error: this benchmark needs `{library}`: pip install onnx onnxscript onnxruntime")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model_name = "bert-base" if args.quick else args.model  # --quick: the tiny BERT of common.build_backbone
    with tempfile.TemporaryDirectory(prefix="read_cost_") as work:
        graph = time_graphs(model_name, args, Path(work))
        reads = time_reads(graph["hidden_size"], args, Path(work))
    results = {"model": model_name, "quick": args.quick, "command": command, "length": args.length,
               "threads": args.threads, "graph_rounds": args.graph_rounds, "read_rounds": args.read_rounds,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "environment": deploy.environment(), "graph": graph, "reads": reads}
    stem = args.out / "deploy_read_cost"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(results, indent=2, allow_nan=False) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown(results))
    print(f"wrote {stem}.md / .json", flush=True)
    return 0


# -- part 1: the whole graph ----------------------------------------------------------------------------


def time_graphs(model_name: str, args: argparse.Namespace, work: Path) -> dict:
    backbone = common.build_backbone(model_name, args.quick).eval()
    model = spartan.wrap_model(common.copy_backbone(backbone, share_weights=True), spartan.SpartanConfig())
    deploy.perturb([v for k, v in spartan.task_state_dict(model).items() if k.startswith("memories.")], seed=0)
    folder = work / "spartan"
    spartan.export_onnx(model.eval(), folder)
    runtime = spartan.OnnxRuntimeModel(folder, threads=args.threads)
    inputs = runtime.manifest["inputs"]
    graph_file = folder / runtime.manifest["graphs"]["fp32"]
    cut_file = work / "no_reads" / "backbone.onnx"
    cut = cut_memory_reads(graph_file, cut_file, len(spartan.get_layer_paths(model)))
    bare_file = work / "bare" / "model.onnx"
    deploy.export_plain(backbone, bare_file, inputs)

    feeds = deploy.token_feeds(backbone.config.vocab_size, 1, args.length, inputs)
    (task,) = runtime.tasks
    task_feeds = {**feeds, **runtime.task_inputs(task)}
    sessions = {
        "bare": (deploy.plain_session(bare_file, args.threads), feeds),
        "bare_no_fusion": (deploy.plain_session(bare_file, args.threads, deploy.NO_FUSION), feeds),
        "spartan": (deploy.plain_session(graph_file, args.threads), task_feeds),
        "spartan_no_reads": (deploy.plain_session(cut_file, args.threads), task_feeds),
    }
    expected = runtime(task, **feeds)
    served = sessions["spartan"][0].run(["logits"], task_feeds)[0][:, : expected.shape[1]]
    if not np.allclose(served, expected, atol=1e-6):
        raise RuntimeError("the session over the exported graph disagrees with OnnxRuntimeModel: please report it")
    # the cut is right when it changes nothing for memories that read nothing: zero values
    silent = {**task_feeds, **{name: np.zeros_like(value) for name, value in task_feeds.items()
                               if name.startswith("memories.") and name.endswith(".values")}}
    cut_check = float(np.abs(sessions["spartan_no_reads"][0].run(["logits"], silent)[0]
                             - sessions["spartan"][0].run(["logits"], silent)[0]).max())
    if cut_check > MAX_READ_DIFFERENCE:
        raise RuntimeError(
            f"the graph with its reads cut out differs by {cut_check:.2e} with zero values: the cut is wrong"
        )
    calls = {name: (lambda s=session, f=f: s.run(["logits"], f)) for name, (session, f) in sessions.items()}
    start = time.perf_counter()
    timed = common.interleaved_timings(calls, "bare", args.graph_rounds, warmup=5 if not args.quick else 1)
    print(f"part 1 ({time.perf_counter() - start:.0f} s): " + ", ".join(
        f"{name} {t['median_s'] * 1e3:.2f} ms" for name, t in timed.items()), flush=True)
    ratios = {}
    for name in timed:
        ratios[name] = {}
        for base in ("bare", "bare_no_fusion"):
            rebased = deploy.rebase(timed[name], timed[base])
            ratios[name][base] = {key: rebased[key] for key in ("ratio", "ratio_ci95")}
    return {"hidden_size": spartan.get_hidden_size(model), "layers": len(spartan.get_layer_paths(model)),
            "memory_shape": runtime.manifest["memory_shape"], "nodes_removed": cut,
            "cut_check_max_abs": cut_check,
            "times": {name: {"median_s": t["median_s"], "times_s": t["times_s"], "vs": ratios[name]}
                      for name, t in timed.items()}}


def cut_memory_reads(source: Path, target: Path, expected_reads: int) -> int:
    """Write ``source`` with every memory read cut out: the ``Add`` of each layer's residual and read (found
    from the ``memories.<i>.values`` input forward) replaced by the residual, then every node whose outputs
    nothing uses removed. Returns the number of nodes removed."""
    import onnx

    model = onnx.load(str(source))
    graph = model.graph
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    reads = 0
    for value in [i.name for i in graph.input if i.name.startswith("memories.") and i.name.endswith(".values")]:
        path, node = [value], None
        while True:  # follow the single chain from the values to the residual's Add
            following = users.get(path[-1], [])
            if len(following) != 1:
                raise RuntimeError(f"{value} does not feed one chain of nodes: the graph's layout changed")
            node = following[0]
            if node.op_type == "Add":
                break
            path.append(node.output[0])
        (residual,) = [name for name in node.input if name != path[-1]]
        for user in users.get(node.output[0], []):
            for index, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[index] = residual
        reads += 1
    if reads != expected_reads:
        raise RuntimeError(f"found {reads} memory reads in the graph, expected {expected_reads}")
    before = len(graph.node)
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        keep = [node for node in graph.node if any(name in used for name in node.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return before - len(graph.node)


# -- part 2: the read alone ----------------------------------------------------------------------------


class _Library(nn.Module):
    def __init__(self, shape: dict) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, tokens: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        s = self.shape
        return dense_read(tokens, keys, values, s["num_parents"], s["children_per_parent"], s["top_k"], 1.0,
                          residual=tokens)[0]


class _ParentMajor(_Library):
    masked = False
    ranked = False
    child_major = False

    def forward(self, tokens: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        P, C, k = self.shape["num_parents"], self.shape["children_per_parent"], self.shape["top_k"]
        parent_logits, child_logits = (tokens @ keys.transpose(-1, -2)).split([P, C * P], dim=-1)
        if self.ranked:
            selected = _rank_select(parent_logits, k)
            weights = parent_logits.masked_fill(~selected, float("-inf")).softmax(-1)
        elif self.masked:
            kth = parent_logits.topk(k, dim=-1).values[..., -1:]
            weights = parent_logits.masked_fill(parent_logits < kth, float("-inf")).softmax(-1)
        else:
            top, indices = parent_logits.topk(k, dim=-1)
            weights = torch.zeros_like(parent_logits).scatter(-1, indices, top.softmax(-1))
        if self.child_major:
            slots = weights.unsqueeze(-2) * child_logits.unflatten(-1, (C, P)).softmax(-2)
        else:
            slots = weights.unsqueeze(-1) * child_logits.unflatten(-1, (P, C)).softmax(-1)
        return tokens + slots.flatten(-2) @ values


def _rank_select(logits: Tensor, k: int) -> Tensor:
    """The top-k of the last dim as a mask, without TopK: parent i is kept when fewer than k parents are
    ahead of it (higher, or equal with a lower index)."""
    n = logits.shape[-1]
    index = torch.arange(n, device=logits.device)
    earlier = index.unsqueeze(0) < index.unsqueeze(1)  # [i, j]: j < i
    mine, theirs = logits.unsqueeze(-1), logits.unsqueeze(-2)
    ahead = (theirs > mine) | ((theirs == mine) & earlier)
    return ahead.sum(-1) < k


def _variant(**flags) -> type:
    return type("_Variant", (_ParentMajor,), flags)


class _Empty(_Library):
    def forward(self, tokens: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        return tokens + 0 * keys[..., :1, :] + 0 * values[..., :1, :]


READS = {
    "library": (_Library, "child"),
    "parent_major": (_variant(), "parent"),
    "masked_parents": (_variant(masked=True), "parent"),
    "rank_select": (_variant(ranked=True), "parent"),
    "rank_select_child_major": (_variant(ranked=True, child_major=True), "child"),
    "empty": (_Empty, "child"),
}


def time_reads(hidden: int, args: argparse.Namespace, work: Path) -> dict:
    config = spartan.SpartanConfig()
    shape = {"num_parents": config.num_parents, "children_per_parent": config.children_per_parent,
             "top_k": config.top_k}
    P, C = config.num_parents, config.children_per_parent
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, args.length, hidden, generator=generator)
    keys = torch.randn(1, P + C * P, hidden, generator=generator) / hidden**0.5
    values = torch.randn(1, C * P, hidden, generator=generator)
    # the parent-major layout: child (c, p) moves from row c * P + p to row p * C + c
    order = torch.arange(C * P).reshape(C, P).T.flatten()
    parent_major_keys = torch.cat([keys[:, :P], keys[:, P:][:, order]], 1)
    layouts = {"child": (keys, values), "parent": (parent_major_keys, values[:, order])}
    expected = _Library(shape)(tokens, keys, values)
    sessions, differences = {}, {}
    for name, (kind, layout) in READS.items():
        module = kind(shape).eval()
        arguments = (tokens, *layouts[layout])
        batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
        program = torch.onnx.export(module, arguments, f=None, dynamo=True, input_names=["tokens", "keys", "values"],
                                    output_names=["out"], verbose=False,
                                    dynamic_shapes=({0: batch, 1: length}, {0: batch}, {0: batch}))
        path = work / f"read_{name}.onnx"
        program.save(str(path))
        session = deploy.plain_session(path, args.threads)
        feeds = {"tokens": tokens.numpy(), "keys": arguments[1].numpy(), "values": arguments[2].numpy()}
        if name != "empty":
            differences[name] = float(np.abs(session.run(["out"], feeds)[0] - expected.numpy()).max())
            if differences[name] > MAX_READ_DIFFERENCE:
                raise RuntimeError(f"the {name} read differs from dense_read by {differences[name]:.2e}")
        sessions[name] = (session, feeds)
    calls = {name: (lambda s=session, f=f: s.run(["out"], f)) for name, (session, f) in sessions.items()}
    start = time.perf_counter()
    timed = common.interleaved_timings(calls, "library", args.read_rounds, warmup=20 if not args.quick else 1)
    print(f"part 2 ({time.perf_counter() - start:.0f} s): " + ", ".join(
        f"{name} {t['median_s'] * 1e6:.0f} us" for name, t in timed.items()), flush=True)
    return {"shape": shape, "hidden_size": hidden,
            "times": {name: {"median_s": t["median_s"], "ratio": t["ratio"], "ratio_ci95": list(t["ratio_ci95"]),
                             "max_abs_difference": differences.get(name)} for name, t in timed.items()}}


# -- output ----------------------------------------------------------------------------------------------


GRAPH_LABELS = {
    "bare": "bare backbone, ONNX Runtime's default optimisations",
    "bare_no_fusion": "bare backbone, SkipLayerNorm fusion off",
    "spartan": "spartan's exported graph (one task fed)",
    "spartan_no_reads": "the same graph with its memory reads cut out",
}


def markdown(results: dict) -> str:
    env, graph, reads = results["environment"], results["graph"], results["reads"]
    source = env["spartan_source"]
    shape = graph["memory_shape"]
    lines = [
        f"# Where spartan's exported latency goes: {results['model']}"
        f"{' (quick smoke run)' if results['quick'] else ''}", "",
        f"`{results['command']}`, {results['date']}.", "",
        f"ONNX Runtime CPU ({env['onnxruntime']}), {results['threads']} intra-op threads, one inter-op thread, no "
        f"spinning; {env['cpu_model'] or env['processor']}, {env['cpu_count']} CPUs visible; torch {env['torch']}, "
        f"spartan {env['spartan']} ({source['commit']}"
        f"{', uncommitted changes' if source['uncommitted_changes'] else ''}). Batch 1 x {results['length']} tokens, "
        f"hidden size {graph['hidden_size']}, {graph['layers']} layers, memories "
        f"{shape['num_parents']} x {shape['children_per_parent']}, top-{shape['top_k']}. Interleaved rounds "
        "(rotating start), medians; ratios are medians over rounds of the per-round ratio, 95% bootstrap "
        "intervals in brackets.", "",
    ]
    if results["quick"]:
        lines += ["**Quick smoke run**: tiny sizes; the figures mean nothing about speed.", ""]
    lines += [f"## The whole graph ({results['graph_rounds']} rounds)", "",
              f"The memory reads cut out: {graph['nodes_removed']} nodes removed (each layer's `residual + read` "
              "replaced by the residual; with every memory's values zero, the cut graph's logits differ from the "
              f"whole graph's by {graph['cut_check_max_abs']:.1e}); what remains differs from the bare graph by the "
              "per-row norms, the per-row head and the task inputs.", "",
              "| graph | ms | vs bare (default) | vs bare (SkipLayerNorm fusion off) |", "|---|---:|---:|---:|"]
    for name, t in graph["times"].items():
        cells = [common.fmt_overhead_interval(t["vs"][base]) for base in ("bare", "bare_no_fusion")]
        lines.append(f"| {GRAPH_LABELS[name]} | {t['median_s'] * 1e3:.2f} | {cells[0]} | {cells[1]} |")
    lines += ["", f"## One memory read alone ({results['read_rounds']} rounds)", "",
              f"Tokens `[1, {results['length']}, {reads['hidden_size']}]`; each way checked against "
              f"`spartan.memory.dense_read` (max |difference| <= {MAX_READ_DIFFERENCE:g}) before it was timed.", "",
              "| read | us | vs library | max abs difference |", "|---|---:|---:|---:|"]
    for name, t in reads["times"].items():
        difference = "–" if t["max_abs_difference"] is None else f"{t['max_abs_difference']:.1e}"
        lines.append(f"| {name} | {t['median_s'] * 1e6:.1f} | {common.fmt_overhead_interval(t)} | {difference} |")
    lines += ["", "The ways are described in the docstring of `benchmarks/deploy_read_cost.py`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
