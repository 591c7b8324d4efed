"""Deployment on ONNX Runtime: spartan's exported backbone against the bare backbone and the peers' exports.

Every method is exported to ONNX and served by ONNX Runtime on CPU, all in one process, with the same
session settings (``intra_op_num_threads`` = ``--threads``, one inter-op thread):

- the bare backbone (plain ``torch.onnx.export(dynamo=True)`` of the Hugging Face classifier, dynamic
  batch and sequence), a second separate export of it (the A/A row: the noise floor), and its int8
  version (``onnxruntime.quantization.quantize_dynamic`` with the library's settings);
- spartan through ``spartan.export_onnx`` (the default ``SpartanConfig``, fp32 and int8), served by
  ``spartan.OnnxRuntimeModel``: the task's tensors are fed as graph inputs on every call;
- peft LoRA r=8 on query and value, merged (``merge_and_unload``) and unmerged, and the AdapterHub
  Pfeiffer adapter (``seq_bn``), exported like the bare backbone. A peer whose export fails is
  recorded with the error's first line and timed in eager PyTorch against the eager bare backbone.

Measured: latency at batch 1 x 128 and 1 x 32 tokens and throughput at 32 x 128 (interleaved rounds,
medians, per-round ratios to the bare backbone of the same precision with a 95% bootstrap interval);
ONNX Runtime against eager logits; bytes on disk for 1, 10 and 100 tasks; the time of
``OnnxRuntimeModel.add_task`` and of switching tasks between calls; and, given memories trained by
``examples/glue_finetune.py``, SST-2 and MRPC dev accuracy of the int8 graph against the fp32 one.

    .venv-bench/bin/python benchmarks/deploy.py --model minilm \\
        --sst2-checkpoint runs/sst2-spartan/best --mrpc-checkpoint runs/mrpc-spartan/best --data-dir ../shared/glue_data
    python benchmarks/deploy.py --quick --model bert-base --out /tmp/deploy        # smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, when run as a script
import common  # noqa: E402

import spartan  # noqa: E402
from spartan import _validate  # noqa: E402
from spartan._io import atomic_write, atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OPSET = 18
TASK, OTHER_TASK = "task_a", "task_b"  # the two spartan tasks of the timed export
TASK_COUNTS = (1, 10, 100)
MB = 10**6  # targets in decimal megabytes

# Shapes (batch, sequence): two latency shapes and one throughput shape.
FULL_SHAPES = {"b1x128": (1, 128), "b1x32": (1, 32), "b32x128": (32, 128)}
QUICK_SHAPES = {"b1x128": (1, 16), "b1x32": (1, 8), "b32x128": (4, 16)}
SHAPE_TITLES = {"b1x128": "latency b1 x {L}", "b1x32": "latency b1 x {L}", "b32x128": "throughput b{B} x {L}"}
LATENCY_SHAPE = "b1x128"  # the shape the latency targets are read at
NO_FUSION = ("SkipLayerNormFusion",)  # the bare rows timed without it too


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", choices=list(common.BACKBONES))
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds at the throughput shape (default 20; 2 with --quick)")
    parser.add_argument("--latency-repeats", type=int, default=None,
                        help="timed rounds at each batch-1 shape (default 100; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="discarded rounds per shape (default 2; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads and torch threads")
    parser.add_argument("--add-task-repeats", type=int, default=None, help="add_task calls timed (default 10; 3 quick)")
    parser.add_argument("--switch-rounds", type=int, default=None, help="task-switch rounds (default 30; 3 quick)")
    parser.add_argument("--sst2-checkpoint", type=Path, help="spartan memory trained on SST-2 (glue_finetune.py best/)")
    parser.add_argument("--mrpc-checkpoint", type=Path, help="spartan memory trained on MRPC (glue_finetune.py best/)")
    parser.add_argument("--data-dir", type=Path, help="GLUE data in the official layout, for the accuracy part")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds, no accuracy: a smoke test")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for deploy_<model>.{md,json,png}")
    args = parser.parse_args(argv)
    defaults = {"repeats": (2, 20), "latency_repeats": (2, 100), "warmup": (1, 2), "add_task_repeats": (3, 10),
                "switch_rounds": (3, 30)}
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    try:
        for name in ("repeats", "latency_repeats", "threads", "add_task_repeats", "switch_rounds"):
            setattr(args, name, _validate.positive_int(f"--{name.replace('_', '-')}", getattr(args, name)))
        args.warmup = _validate.integer("--warmup", args.warmup, minimum=0)
    except ValueError as error:
        parser.error(str(error))
    args.accuracy_skipped = accuracy_skip_reason(parser, args)
    return args


def accuracy_skip_reason(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Why the accuracy part does not run (None when it does); stops with an error on unusable options."""
    checkpoints = {"sst2": args.sst2_checkpoint, "mrpc": args.mrpc_checkpoint}
    given = {task: path for task, path in checkpoints.items() if path is not None}
    if not given:
        return "no --sst2-checkpoint / --mrpc-checkpoint given"
    if args.quick:
        return "--quick skips the accuracy part"
    for task, path in given.items():
        if not path.is_dir():
            parser.error(f"--{task}-checkpoint {path} is not a folder: pass the best/ folder glue_finetune.py wrote")
    if args.data_dir is None:
        parser.error("the accuracy part needs --data-dir (the GLUE data in the official layout; nothing downloads)")
    if len(given) < len(checkpoints):
        missing = sorted(set(checkpoints) - set(given))
        print(f"note: no --{missing[0]}-checkpoint: accuracy on {', '.join(given)} only", flush=True)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.command = "python benchmarks/deploy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    for library in ("onnxruntime", "onnxscript", "onnx"):
        if not common.library_available(library):
            sys.exit(f"error: the deployment benchmark needs `{library}`: pip install onnx onnxscript onnxruntime")
    torch.set_num_threads(args.threads)
    common.import_peers()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deploy_bench_") as work:
        results = run(args, Path(work))
    write_results(results, args)
    return 0


# -- methods: export, session, call ------------------------------------------------------------------


@dataclass
class Deployed:
    """One method as it is served: its label, its baseline row, one call per shape, what it stores."""

    name: str
    label: str
    library: str
    precision: str  # "fp32", "int8" or "eager"
    baseline: str  # the row its ratios are taken against
    make_call: Callable[[dict[str, np.ndarray]], Callable[[], None]] | None = None
    info: dict = field(default_factory=dict)


class _Logits(nn.Module):
    """The classifier's forward from token tensors ``[B, S]`` to its logits ``[B, labels]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **types).logits


def export_plain(model: nn.Module, path: Path, input_names: list[str]) -> float:
    """``torch.onnx.export(dynamo=True)`` of ``model``'s logits, batch and sequence dynamic, at the library's
    opset and example shape; seconds taken."""
    model.eval()
    batch, length = 3, 8  # as spartan.export_onnx: no dimension 0, 1 or equal to another
    generator = torch.Generator().manual_seed(0)
    example = [torch.randint(3, model.config.vocab_size, (batch, length), generator=generator)]
    example += [torch.ones(batch, length, dtype=torch.long) if name == "attention_mask"
                else torch.zeros(batch, length, dtype=torch.long) for name in input_names[1:]]
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=model.config.max_position_embeddings)}
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(
            _Logits(model), tuple(example), f=None, dynamo=True, dynamic_shapes={name: dims for name in input_names},
            input_names=input_names, output_names=["logits"], opset_version=OPSET, verbose=False,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = sum(int(np.prod(t.shape)) * t.dtype.itemsize for t in program.model.graph.initializers.values())
    program.save(str(path), external_data=weights > 1 << 30)  # protocol buffers stop at 2 GiB
    return time.perf_counter() - start


def quantize_int8(source: Path, target: Path) -> float:
    """``spartan.export.quantize_int8`` (what ``spartan.export_onnx(quantize="int8")`` runs); seconds taken."""
    from spartan.export import quantize_int8 as quantize

    start = time.perf_counter()
    quantize(source, target)
    return time.perf_counter() - start


def session_options(threads: int):
    """The ONNX Runtime options every method runs under: ``threads`` intra-op threads, one inter-op
    thread (as ``spartan.OnnxRuntimeModel(threads=...)`` sets) and no spinning: by default a session's
    intra-op threads keep spinning after each run, and on a machine with as many cores as threads they
    slow whichever session runs next, so interleaved timings would mostly measure the previous method's
    threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def plain_session(path: Path, threads: int, disabled_optimizers: tuple[str, ...] = ()):
    """An ONNX Runtime CPU session over ``path`` with ``session_options(threads)``, without the graph
    optimizers named in ``disabled_optimizers``."""
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"],
                                        disabled_optimizers=list(disabled_optimizers))


def open_runtime(folder: Path, graph: str, threads: int):
    """``spartan.OnnxRuntimeModel`` over ``folder``'s ``graph`` under ``session_options(threads)``."""
    return spartan.OnnxRuntimeModel(folder, graph=graph, threads=threads, session_options=session_options(threads))


def session_call(session) -> Callable[[dict[str, np.ndarray]], Callable[[], None]]:
    def make(feeds: dict[str, np.ndarray]) -> Callable[[], None]:
        return lambda: session.run(["logits"], feeds)

    return make


def runtime_call(runtime, task: str) -> Callable[[dict[str, np.ndarray]], Callable[[], None]]:
    def make(feeds: dict[str, np.ndarray]) -> Callable[[], None]:
        return lambda: runtime(task, **feeds)

    return make


def eager_call(model: nn.Module) -> Callable[[dict[str, np.ndarray]], Callable[[], None]]:
    def make(feeds: dict[str, np.ndarray]) -> Callable[[], None]:
        inputs = {key: torch.from_numpy(value) for key, value in feeds.items()}

        def call() -> None:
            with torch.inference_mode():
                model(**inputs)

        return call

    return make


def token_feeds(vocab: int, batch: int, length: int, input_names: list[str], seed: int = 0,
                pad_last: bool = False) -> dict[str, np.ndarray]:
    """Random token ids in [3, vocab), a full attention mask (the last row's last quarter padded with
    ``pad_last``), zero token types: numpy int64 ``[batch, length]`` each."""
    generator = torch.Generator().manual_seed(seed)
    feeds = {"input_ids": torch.randint(3, vocab, (batch, length), generator=generator).numpy(),
             "attention_mask": np.ones((batch, length), np.int64)}
    if pad_last and batch > 1 and length > 3:
        feeds["attention_mask"][-1, length - length // 4:] = 0
    if "token_type_ids" in input_names:
        feeds["token_type_ids"] = np.zeros((batch, length), np.int64)
    return {name: feeds[name] for name in input_names}


def perturb(tensors, seed: int, scale: float = 0.1) -> None:
    """Add ``scale`` x N(0, 1) noise to ``tensors`` in place: new memories (zero values) and LoRA (zero B) start
    as no-ops, which would make an ORT-against-eager check vacuous. It changes no arithmetic's cost."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors:
            tensor.add_(scale * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))


def max_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# -- the run -------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict:
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    print(f"== deploy {args.model}{' (quick)' if args.quick else ''}: exporting", flush=True)
    backbone = common.build_backbone(args.model, args.quick).eval()
    vocab = backbone.config.vocab_size
    check_shapes = [shapes["b1x128"], shapes["b1x32"], (3, shapes["b1x128"][1] // 2 + 1)]
    notes: list[str] = []

    methods, eager_models, spartan_parts = build_methods(backbone, work, args, check_shapes, notes)
    input_names = spartan_parts["input_names"]
    del backbone
    gc.collect()

    timings = time_methods(methods, shapes, vocab, input_names, args)
    storage = storage_table(methods, spartan_parts)
    switch = time_switch(spartan_parts["runtime_fp32"], shapes, vocab, input_names, args)
    add_task = time_add_task(spartan_parts["runtime_fp32"], spartan_parts["checkpoint"], args)
    del eager_models
    gc.collect()
    accuracy = measure_accuracy(args, work) if args.accuracy_skipped is None else {"skipped": args.accuracy_skipped}
    if "skipped" in accuracy:
        print(f"accuracy part skipped: {accuracy['skipped']}", flush=True)

    config = spartan.SpartanConfig()
    results = {
        "model": args.model,
        "quick": args.quick,
        "command": args.command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "threads": args.threads,
        "repeats": args.repeats,
        "latency_repeats": args.latency_repeats,
        "warmup": args.warmup,
        "shapes": {name: list(shape) for name, shape in shapes.items()},
        "check_shapes": [list(shape) for shape in check_shapes],
        "hidden_size": spartan_parts["hidden_size"],
        "num_layers": spartan_parts["num_layers"],
        "spartan_config": config.to_dict(),
        "inputs": input_names,
        "methods": {m.name: {"label": m.label, "library": m.library, "precision": m.precision,
                             "baseline": m.baseline, **m.info, "time": timings[m.name]} for m in methods.values()},
        "storage": storage,
        "switch": switch,
        "add_task": add_task,
        "accuracy": accuracy,
        "notes": notes,
    }
    results["targets"] = targets(results)
    return results


def build_methods(backbone: nn.Module, work: Path, args, check_shapes, notes: list[str]):
    """Export every method, open its session, check ORT against eager; returns the methods, the eager models
    kept for timing (peers that did not export) and spartan's pieces (runtimes, checkpoint, inputs)."""
    methods: dict[str, Deployed] = {}
    eager_models: dict[str, nn.Module] = {}
    vocab = backbone.config.vocab_size

    # spartan first: its manifest says which token inputs the graphs take, and every plain export takes the same
    model = spartan.wrap_model(common.copy_backbone(backbone, share_weights=True), spartan.SpartanConfig(), name=TASK)
    spartan.add_memory(model, OTHER_TASK, spartan.SpartanConfig())
    for seed, name in enumerate((TASK, OTHER_TASK)):
        tensors = spartan.task_state_dict(model, name)
        perturb([value for key, value in tensors.items() if key.startswith("memories.")], seed)
    spartan.set_active_memory(model, TASK)
    model.eval()
    folder = work / "spartan"
    start = time.perf_counter()
    spartan.export_onnx(model, folder, quantize="int8")
    export_s = time.perf_counter() - start
    runtime_fp32 = open_runtime(folder, "fp32", args.threads)
    runtime_int8 = open_runtime(folder, "int8", args.threads)
    input_names = [name for name in runtime_fp32.manifest["inputs"] if name != "task_ids"]
    graphs = runtime_fp32.manifest["graphs"]
    checkpoint = spartan.save_memory(model, work / "spartan_task_checkpoint", TASK)
    task_bytes = common.folder_bytes(folder / spartan.export.TASKS_FOLDER / TASK)["bytes"]
    fp32_check = check_against_eager(lambda feeds: runtime_fp32(TASK, **feeds), model, vocab, input_names,
                                     check_shapes)
    int8_check = check_against_eager(lambda feeds: runtime_int8(TASK, **feeds), model, vocab, input_names,
                                     check_shapes)
    spartan_info = {"exported": True, "export_s": export_s, "task_bytes": task_bytes}
    config = spartan.get_config(model, TASK)
    label = f"spartan {config.num_parents}x{config.children_per_parent} top-{config.top_k} (export_onnx)"
    methods["spartan"] = Deployed(
        "spartan", label, "spartan", "fp32", "bare", runtime_call(runtime_fp32, TASK),
        {**spartan_info, "graph_bytes": graph_bytes(folder / graphs["fp32"]), "ort_vs_eager_max_abs": fp32_check},
    )
    methods["spartan_int8"] = Deployed(
        "spartan_int8", f"{label}, int8", "spartan", "int8", "bare_int8",
        runtime_call(runtime_int8, TASK),
        {**spartan_info, "graph_bytes": graph_bytes(folder / graphs["int8"]), "int8_vs_eager_max_abs": int8_check},
    )
    spartan_parts = {
        "runtime_fp32": runtime_fp32, "checkpoint": checkpoint, "input_names": input_names,
        "hidden_size": spartan.get_hidden_size(model), "num_layers": len(spartan.get_layer_paths(model)),
    }
    print(f"   spartan: exported in {export_s:.1f} s; ORT fp32 vs eager max |diff| {fp32_check:.2e}", flush=True)
    del model
    gc.collect()

    # the bare backbone, twice (A/A), and its int8 version
    for name, label in (("bare", "bare backbone (floor)"), ("bare_copy", "bare backbone, 2nd export (A/A)")):
        path = work / name / "model.onnx"
        seconds = export_plain(backbone, path, input_names)
        session = plain_session(path, args.threads)
        check = check_against_eager(session_runner(session), backbone, vocab, input_names, check_shapes)
        methods[name] = Deployed(name, label, "transformers", "fp32", "bare", session_call(session), {
            "exported": True, "export_s": seconds, "graph_bytes": graph_bytes(path), "ort_vs_eager_max_abs": check})
    int8_path = work / "bare" / "model.int8.onnx"
    seconds = quantize_int8(work / "bare" / "model.onnx", int8_path)
    session = plain_session(int8_path, args.threads)
    check = check_against_eager(session_runner(session), backbone, vocab, input_names, check_shapes)
    methods["bare_int8"] = Deployed("bare_int8", "bare backbone, int8", "transformers", "int8", "bare_int8",
                                    session_call(session), {"exported": True, "quantize_s": seconds,
                                                            "graph_bytes": graph_bytes(int8_path),
                                                            "int8_vs_eager_max_abs": check})
    # the same two bare graphs without ONNX Runtime's SkipLayerNormalization fusion: a faster bare session on
    # some CPUs (spartan's per-row norms are never fused into it), so the latency targets are read against the
    # faster of the two bare sessions
    for name, label, path, precision, baseline in (
            ("bare_no_fusion", "bare backbone, SkipLayerNorm fusion off", work / "bare" / "model.onnx", "fp32", "bare"),
            ("bare_int8_no_fusion", "bare backbone, int8, SkipLayerNorm fusion off", int8_path, "int8", "bare_int8")):
        session = plain_session(path, args.threads, NO_FUSION)
        check = check_against_eager(session_runner(session), backbone, vocab, input_names, check_shapes)
        methods[name] = Deployed(name, label, "transformers", precision, baseline, session_call(session), {
            "exported": True, "graph_bytes": graph_bytes(path), "disabled_optimizers": list(NO_FUSION),
            f"{'ort' if precision == 'fp32' else 'int8'}_vs_eager_max_abs": check})

    # the peers: exported like the bare backbone; eager PyTorch where the export fails
    peers = [("lora_merged", "peft LoRA r8 q,v merged", "lora_merged"), ("lora", "peft LoRA r8 q,v unmerged", "lora"),
             ("seq_bn", "adapters seq_bn (Pfeiffer) rf16", "seq_bn")]
    for name, label, method_name in peers:
        method = common.METHODS[method_name]
        if not common.library_available(method.requires):
            line = (f"{name}: skipped, the `{method.requires}` package is not installed "
                    "(peers run in the benchmark environment, see benchmarks/README.md)")
            print(line, flush=True)
            notes.append(line)
            continue
        built = common.build_method(method, common.copy_backbone(backbone, share_weights=not method.writes_backbone))
        peer = built.model.eval()
        if name != "lora_merged":  # merged LoRA's adapter was merged at build time: nothing left to perturb
            perturb([p for key, p in peer.named_parameters() if p.requires_grad and "classifier" not in key], seed=7)
        with tempfile.TemporaryDirectory(prefix=f"adapter_{name}_") as saved:
            built.save(Path(saved))
            adapter_bytes = common.folder_bytes(Path(saved))["bytes"]
        path = work / name / "model.onnx"
        try:
            seconds = export_plain(peer, path, input_names)
            session = plain_session(path, args.threads)
        except Exception as error:  # noqa: BLE001 -- a peer that does not export is a result, not a crash
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            line = f"{name}: the ONNX export failed ({type(error).__name__}: {first}); timed in eager PyTorch instead"
            print(line, flush=True)
            notes.append(line)
            eager_models[name] = peer
            methods[name] = Deployed(name, f"{label} (eager PyTorch: no export)", method.requires, "eager",
                                     "bare_eager", eager_call(peer),
                                     {"exported": False, "export_error": f"{type(error).__name__}: {first}",
                                      "adapter_bytes": adapter_bytes})
            continue
        check = check_against_eager(session_runner(session), peer, vocab, input_names, check_shapes)
        info = {"exported": True, "export_s": seconds, "graph_bytes": graph_bytes(path), "ort_vs_eager_max_abs": check}
        if name != "lora_merged":
            info["adapter_bytes"] = adapter_bytes
        methods[name] = Deployed(name, label, method.requires, "fp32", "bare", session_call(session), info)
        print(f"   {name}: exported in {seconds:.1f} s; ORT vs eager max |diff| {check:.2e}", flush=True)
        del built, peer
        gc.collect()
    if eager_models:  # the eager peers' baseline: the bare backbone in eager PyTorch, in the same rounds
        eager_models["bare_eager"] = backbone
        methods["bare_eager"] = Deployed("bare_eager", "bare backbone (eager PyTorch)", "transformers", "eager",
                                         "bare_eager", eager_call(backbone), {"exported": False})
    order = ["bare", "bare_copy", "bare_no_fusion", "spartan", "lora_merged", "lora", "seq_bn", "bare_int8",
             "bare_int8_no_fusion", "spartan_int8", "bare_eager"]
    return {name: methods[name] for name in order if name in methods}, eager_models, spartan_parts


def session_runner(session) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    return lambda feeds: session.run(["logits"], feeds)[0]


def graph_bytes(path: Path) -> int:
    """Bytes of an exported graph and of its external-data file (``<name>.data``) if it has one."""
    return sum(file.stat().st_size for file in path.parent.iterdir()
               if file.is_file() and (file.name == path.name or file.name.startswith(path.name + ".")))


def check_against_eager(served: Callable[[dict[str, np.ndarray]], np.ndarray], model: nn.Module, vocab: int,
                        input_names: list[str], check_shapes) -> float:
    """Largest |served logits - eager logits| over ``check_shapes`` (the multi-row one with a padded row)."""
    worst = 0.0
    for index, (batch, length) in enumerate(check_shapes):
        feeds = token_feeds(vocab, batch, length, input_names, seed=100 + index, pad_last=True)
        with torch.inference_mode():
            expected = model(**{key: torch.from_numpy(value) for key, value in feeds.items()}).logits.numpy()
        worst = max(worst, max_difference(served(feeds), expected))
    return worst


def time_methods(methods: dict[str, Deployed], shapes, vocab: int, input_names: list[str], args) -> dict:
    """Interleaved rounds per shape; every method's ratio against its own baseline, round by round."""
    timings: dict[str, dict] = {name: {} for name in methods}
    for shape_name, (batch, length) in shapes.items():
        feeds = token_feeds(vocab, batch, length, input_names)
        calls = {name: m.make_call(feeds) for name, m in methods.items()}
        start = time.perf_counter()
        repeats = args.repeats if shape_name == "b32x128" else args.latency_repeats
        measured = common.interleaved_timings(calls, "bare", repeats, args.warmup)
        for name, timing in measured.items():
            timings[name][shape_name] = rebase(timing, measured[methods[name].baseline])
            if shape_name == "b32x128":
                timings[name][shape_name]["sequences_per_s"] = batch / timing["median_s"]
        print(f"   {shape_title(shape_name, (batch, length))} ({time.perf_counter() - start:.0f} s): " + ", ".join(
            f"{name} {timings[name][shape_name]['median_s'] * 1e3:.1f} ms "
            f"({common.fmt_overhead(timings[name][shape_name]['ratio'])})" for name in methods), flush=True)
        del calls
        gc.collect()
    return timings


def rebase(timing: dict, baseline: dict) -> dict:
    """``timing`` with its ratios taken round by round against ``baseline`` (timed in the same rounds)."""
    ratios = [value / base for value, base in zip(timing["times_s"], baseline["times_s"])]
    return {"median_s": timing["median_s"], "ratio": statistics.median(ratios),
            "ratio_ci95": list(common.bootstrap_median_interval(ratios)), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "times_s": timing["times_s"], "ratios": ratios}


def shape_title(shape_name: str, shape) -> str:
    return SHAPE_TITLES[shape_name].format(B=shape[0], L=shape[1])


def storage_table(methods: dict[str, Deployed], spartan_parts) -> dict:
    """Bytes on disk for 1, 10 and 100 tasks: what is stored once and what each task adds."""
    def row(label: str, shared: int, per_task: int, note: str) -> dict:
        return {"label": label, "shared_bytes": shared, "per_task_bytes": per_task, "note": note,
                "total_bytes": {str(n): shared + n * per_task for n in TASK_COUNTS}}

    bare = methods["bare"].info["graph_bytes"]
    table = {}
    for name, precision in (("spartan", "fp32"), ("spartan_int8", "int8")):
        info = methods[name].info
        table[name] = row(f"spartan, {precision} graph + task folders", info["graph_bytes"], info["task_bytes"],
                          f"backbone.{'int8.' if precision == 'int8' else ''}onnx once + one tasks/<name>/ folder per "
                          "task (export_onnx with quantize='int8' also writes the fp32 graph: not counted here)")
    table["bare"] = row("bare backbone, one graph per task", 0, bare, "a separate exported classifier per task")
    if "lora_merged" in methods:
        merged = methods["lora_merged"].info["graph_bytes"]
        table["lora_merged"] = row("peft LoRA merged, one graph per task", 0, merged,
                                   "the adapter merged into the weights: a full exported model per task")
    for name in ("lora", "seq_bn"):
        if name not in methods:
            continue
        info = methods[name].info
        if not info["exported"]:
            table[name] = {"label": f"{methods[name].label}", "note": f"not exported: {info['export_error']}",
                           "per_task_bytes": info["adapter_bytes"], "shared_bytes": None, "total_bytes": None}
            continue
        table[name] = row(f"{methods[name].label}, backbone + adapter files", bare, info["adapter_bytes"],
                          "the bare graph once + the library's adapter checkpoint per task; the exported graph "
                          "holds the adapter as constants, so this needs the adapter weights swapped into one "
                          "session's initializers at load time")
        table[f"{name}_graphs"] = row(f"{methods[name].label}, one graph per task (as exported)", 0,
                                      info["graph_bytes"], "one exported graph per task, adapter inside")
    return table


def time_switch(runtime, shapes, vocab: int, input_names: list[str], args) -> dict:
    """Per latency shape: the time of a call with another task than the previous call, minus a same-task call.

    Each round calls task X once untimed, then times X again (same) and then Y (switch); X alternates
    between the two tasks round by round. The extra time is the median over rounds of (switch - same)."""
    results = {}
    for shape_name in ("b1x128", "b1x32"):
        batch, length = shapes[shape_name]
        feeds = token_feeds(vocab, batch, length, input_names, seed=1)
        same, switched = [], []
        for round_index in range(args.switch_rounds + 1):  # round 0 warms up
            first, second = (TASK, OTHER_TASK) if round_index % 2 == 0 else (OTHER_TASK, TASK)
            runtime(first, **feeds)
            same_s = common.timed(lambda first=first, feeds=feeds: runtime(first, **feeds))
            switch_s = common.timed(lambda second=second, feeds=feeds: runtime(second, **feeds))
            if round_index:
                same.append(same_s)
                switched.append(switch_s)
        extra = [s - t for s, t in zip(switched, same)]
        results[shape_name] = {
            "shape": [batch, length], "same_task_median_s": statistics.median(same),
            "switch_median_s": statistics.median(switched), "extra_median_s": statistics.median(extra),
            "extra_ci95_s": list(common.bootstrap_median_interval(extra)), "rounds": len(extra),
        }
        print(f"   switch at {shape_title(shape_name, (batch, length))}: "
              f"{results[shape_name]['extra_median_s'] * 1e3:+.3f} ms", flush=True)
    return results


def time_add_task(runtime, checkpoint: Path, args) -> dict:
    """``add_task`` of a saved memory into the live fp32 runtime (and its folder), timed call by call."""
    times = []
    for index in range(args.add_task_repeats):
        start = time.perf_counter()
        runtime.add_task(f"added_{index}", checkpoint)
        times.append(time.perf_counter() - start)
    print(f"   add_task: median {statistics.median(times) * 1e3:.1f} ms over {len(times)}", flush=True)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times,
            "tasks_after": len(runtime.tasks)}


# -- accuracy: int8 against fp32 on GLUE dev ------------------------------------------------------------


def measure_accuracy(args, work: Path) -> dict:
    """Dev-set metrics of each given task's memory, exported with int8: eager, ORT fp32 and ORT int8."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from spartan import glue

    path = common.minilm_path()  # the backbone examples/glue_finetune.py trains on
    tokenizer = AutoTokenizer.from_pretrained(path)
    results = {"backbone": "all-MiniLM-L6-v2", "max_length": 128}
    for task_name, checkpoint in (("sst2", args.sst2_checkpoint), ("mrpc", args.mrpc_checkpoint)):
        if checkpoint is None:
            continue
        task = glue.get_task(task_name)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels)
        try:
            spartan.load_memory(model, checkpoint, name=task_name)
        except (OSError, ValueError) as error:
            sys.exit(f"error: --{task_name}-checkpoint {checkpoint}: {error}")
        model.eval()
        try:
            dev = glue.load_glue(task, data_dir=args.data_dir)[task.validation_split]
        except (OSError, ValueError) as error:
            sys.exit(f"error: --data-dir {args.data_dir}: {error}")
        folder = spartan.export_onnx(model, work / f"accuracy_{task_name}", quantize="int8")
        references = np.asarray(dev["label"])
        tokenized = glue.tokenize_glue(dev, tokenizer, task, 128)
        columns = [c for c in tokenized.column_names if c in tokenizer.model_input_names]
        row = {"checkpoint": str(checkpoint), "examples": len(references),
               "eager": glue.evaluate(model, tokenizer, task, dataset=dev, progress=False)}
        predictions = {}
        for graph in ("fp32", "int8"):
            runtime = spartan.OnnxRuntimeModel(folder, graph=graph, threads=args.threads)
            logits = []
            for start in range(0, len(tokenized), 64):
                rows = tokenized.select(range(start, min(start + 64, len(tokenized)))).select_columns(columns)
                padded = tokenizer.pad(rows.to_dict(), return_tensors="np")
                feeds = {k: padded[k] for k in runtime.manifest["inputs"] if k in padded}
                logits.append(runtime(task_name, **feeds))
            predictions[graph] = np.concatenate(logits).argmax(-1)
            row[graph] = glue.compute_metrics(task, predictions[graph], references)
        row["int8_minus_fp32_points"] = {k: 100 * (row["int8"][k] - row["fp32"][k]) for k in row["fp32"]}
        row["int8_fp32_agreement"] = float(np.mean(predictions["int8"] == predictions["fp32"]))
        results[task_name] = row
        print(f"   accuracy {task_name}: fp32 {row['fp32']['accuracy']:.4f}, int8 {row['int8']['accuracy']:.4f}, "
              f"eager {row['eager']['accuracy']:.4f}", flush=True)
        del model
        gc.collect()
    return results


# -- targets ----------------------------------------------------------------------------------------------


def targets(results: dict) -> list[dict]:
    """Each target with its measured value and met (True / False), or None with the reason it was not measured."""
    methods, storage = results["methods"], results["storage"]
    rows = []

    def add(name: str, wanted: str, value: str, met: bool | None, note: str = "") -> None:
        rows.append({"target": name, "wanted": wanted, "value": value, "met": met, "note": note})

    diff = methods["spartan"]["ort_vs_eager_max_abs"]
    add("spartan fp32 ORT vs eager logits", "max abs difference <= 1e-4", f"{diff:.2e}", diff <= 1e-4,
        "shapes " + ", ".join(f"{b}x{n}" for b, n in results["check_shapes"]) + ", the last with a padded row")
    shape = results["shapes"][LATENCY_SHAPE]
    for name, limit, bases in (("spartan", 0.03, ("bare", "bare_no_fusion")),
                               ("spartan_int8", 0.05, ("bare_int8", "bare_int8_no_fusion"))):
        timed = {base: methods[base]["time"][LATENCY_SHAPE] for base in bases if base in methods}
        fastest = min(timed, key=lambda base: timed[base]["median_s"])  # the target is read against the faster
        t = rebase(methods[name]["time"][LATENCY_SHAPE], timed[fastest])
        low, high = t["ratio_ci95"]
        note = f"95% interval {(low - 1) * 100:+.1f}..{(high - 1) * 100:+.1f}%"
        if low <= 1 + limit < high:
            note += ", the interval straddles the target: not resolved"
        for other in timed:
            if other != fastest:
                against = rebase(methods[name]["time"][LATENCY_SHAPE], timed[other])["ratio"]
                note += f"; against the slower {methods[other]['label']}: {(against - 1) * 100:+.1f}%"
        if name == "spartan" and results["model"] != "minilm":
            note += "; the target is stated for MiniLM, this run is " + results["model"]
        note += f"; read against the faster bare session here: {methods[fastest]['label']}"
        add(f"{methods[name]['label']} overhead over the bare exported backbone (the faster of its two sessions), "
            f"b{shape[0]} x {shape[1]}", f"<= {limit:.0%}", f"{(t['ratio'] - 1) * 100:+.1f}%",
            t["ratio"] - 1 <= limit, note)
    accuracy = results["accuracy"]
    for task in ("sst2", "mrpc"):
        if task in accuracy:
            delta = accuracy[task]["int8_minus_fp32_points"]["accuracy"]
            fp32_acc, int8_acc = (accuracy[task][graph]["accuracy"] * 100 for graph in ("fp32", "int8"))
            add(f"int8 vs fp32 accuracy, {task} dev", "within 1 point", f"{delta:+.2f} points", abs(delta) <= 1.0,
                f"fp32 {fp32_acc:.2f}, int8 {int8_acc:.2f}")
        else:
            add(f"int8 vs fp32 accuracy, {task} dev", "within 1 point", "not measured", None,
                accuracy.get("skipped", f"no --{task}-checkpoint"))
    fp32, int8 = methods["spartan"]["graph_bytes"], methods["spartan_int8"]["graph_bytes"]
    add("int8 backbone file vs fp32", "<= 1/3", f"{int8 / fp32:.3f} ({int8:,} / {fp32:,} bytes)", int8 * 3 <= fp32,
        f"bare: {methods['bare_int8']['graph_bytes'] / methods['bare']['graph_bytes']:.3f}")
    added = storage["spartan"]["total_bytes"]["100"] - storage["spartan"]["shared_bytes"]
    add("100 spartan tasks beyond the backbone", "<= 110 MB (decimal)", f"{added / MB:.1f} MB ({added:,} bytes)",
        added <= 110 * MB, f"{spartan.format_bytes(added)} in binary units")
    median = results["add_task"]["median_s"]
    add("add_task to a live OnnxRuntimeModel", "< 50 ms", f"{median * 1e3:.1f} ms (median)", median < 0.05,
        f"max {results['add_task']['max_s'] * 1e3:.1f} ms over {len(results['add_task']['times_s'])}")
    return rows


# -- output -----------------------------------------------------------------------------------------------


def environment() -> dict:
    versions = common.environment()
    for name in ("onnx", "onnxscript", "onnxruntime"):
        versions[name] = getattr(__import__(name), "__version__", None)
    versions["cpu_count"] = os.cpu_count()
    versions["cpu_model"] = _cpu_model()
    return versions


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def fmt_met(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[met]


def fmt_ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:,.2f}"


def fmt_bytes(n: int | None) -> str:
    return "–" if n is None else f"{n / MB:,.1f} MB"


def markdown(results: dict) -> str:
    env, methods, shapes = results["environment"], results["methods"], results["shapes"]
    source = env["spartan_source"]
    lines = [
        f"# Deployment on ONNX Runtime: {results['model']}{' (quick smoke run)' if results['quick'] else ''}",
        "",
        f"`{results['command']}`, {results['date']}.",
        "",
        f"ONNX Runtime CPU ({env['onnxruntime']}), {results['threads']} intra-op threads, one inter-op thread, "
        f"torch threads {results['threads']}; {results['hidden_size']} hidden, {results['num_layers']} layers; "
        f"{env['cpu_model'] or env['processor']}, {env['cpu_count']} CPUs visible, {env['platform']}; "
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, adapters {env['adapters']}, "
        f"onnx {env['onnx']}, onnxscript {env['onnxscript']}, spartan {env['spartan']} "
        f"({source['commit']}{', uncommitted changes' if source['uncommitted_changes'] else ''}).",
        "",
        f"Methods interleaved in each round (rotating start), {results['warmup']} warm-up round(s) discarded, "
        f"medians over {results['latency_repeats']} rounds at batch 1 and {results['repeats']} at batch "
        f"{shapes['b32x128'][0]}; overhead = median over rounds of (method / its baseline in the "
        "same round) - 1, in brackets its 95% bootstrap interval. Baselines: fp32 graphs against the bare fp32 "
        "export, int8 graphs against the bare int8 graph, eager PyTorch rows against the eager bare backbone. The "
        "A/A row is a second, separate export of the bare backbone timed like any method: its overhead is the "
        "noise of this run. The rows 'SkipLayerNorm fusion off' are sessions over the same bare graphs with ONNX "
        "Runtime's `SkipLayerNormFusion` disabled (its fused kernel can be slower than the plain operators it "
        "replaces, and spartan's per-row norms are never fused into it): the latency targets are read against "
        "whichever bare session is faster. spartan is called through `OnnxRuntimeModel` (its per-call feeding of "
        "the task's tensors included); the plain graphs through `InferenceSession.run`. Every session, spartan's "
        "included, "
        "runs with `session.intra_op.allow_spinning = 0`: with ONNX Runtime's default, the threads of the "
        "session that ran last keep spinning and slow the next method's call on a machine with no spare cores.",
        "",
    ]
    if results["quick"]:
        lines += ["**Quick smoke run**: a tiny random model and tiny shapes; the figures check that the benchmark "
                  "runs and mean nothing about speed.", ""]
    lines += ["## Latency and throughput", ""]
    header = ["method", "graph", "vs"]
    for name, shape in shapes.items():
        header += [f"{shape_title(name, shape)} (ms)", "overhead"]
    header.append(f"seq/s b{shapes['b32x128'][0]}")
    lines += ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for name, m in methods.items():
        cells = [m["label"], m["precision"], m["baseline"]]
        for shape_name in shapes:
            t = m["time"][shape_name]
            cells += [fmt_ms(t["median_s"]), "baseline" if name == m["baseline"] else common.fmt_overhead_interval(t)]
        cells.append(f"{m['time']['b32x128']['sequences_per_s']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Export and correctness", "",
              "Max |logits difference| of the served graph against the eager PyTorch model on "
              f"{len(shapes)} shapes (b1 x {shapes['b1x128'][1]}, b1 x {shapes['b1x32'][1]}, "
              f"b3 x {shapes['b1x128'][1] // 2 + 1} with a padded row); memories and adapters carry random "
              "values so that the check is not vacuous.", "",
              "| method | exported | export s | graph bytes | max abs diff vs eager | note |",
              "|---|---|---:|---:|---:|---|"]
    for m in methods.values():
        diff = m.get("ort_vs_eager_max_abs", m.get("int8_vs_eager_max_abs"))
        seconds = m.get("export_s", m.get("quantize_s"))
        note = m.get("export_error", "")
        if "int8_vs_eager_max_abs" in m:
            note = "int8 against the fp32 eager model (quantization error, not a bug)"
        size = "–" if "graph_bytes" not in m else f"{m['graph_bytes']:,}"
        lines.append(f"| {m['label']} | {'yes' if m['exported'] else 'no'} | "
                     f"{'–' if seconds is None else f'{seconds:.1f}'} | {size} | "
                     f"{'–' if diff is None else f'{diff:.2e}'} | {note} |")

    lines += ["", "## Storage on disk", "",
              "| stored | once | per task | 1 task | 10 tasks | 100 tasks | note |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for row in results["storage"].values():
        totals = row["total_bytes"] or {}
        lines.append(f"| {row['label']} | {fmt_bytes(row['shared_bytes'])} | {fmt_bytes(row['per_task_bytes'])} | "
                     + " | ".join(fmt_bytes(totals.get(str(n))) for n in TASK_COUNTS) + f" | {row['note']} |")
    lines += ["", "MB = 10^6 bytes. Per task: spartan's `tasks/<name>/` folder as `export_onnx` writes it; the peers' "
              "adapter checkpoints as their libraries save them (peft `save_pretrained`, adapters `save_adapter` + "
              "the head)."]

    add, switch = results["add_task"], results["switch"]
    lines += ["", "## Adding and switching tasks", "",
              f"`OnnxRuntimeModel.add_task` (fp32 session, the checkpoint copied into the deployed folder and the "
              f"manifest rewritten, each file flushed to disk): median {add['median_s'] * 1e3:.1f} ms, "
              f"min {add['min_s'] * 1e3:.1f}, max {add['max_s'] * 1e3:.1f} over {len(add['times_s'])} calls.", "",
              "| shape | same-task call (ms) | call after another task (ms) | extra (ms) | 95% interval |",
              "|---|---:|---:|---:|---|"]
    for name, s in switch.items():
        low, high = s["extra_ci95_s"]
        lines.append(f"| {shape_title(name, s['shape'])} | {fmt_ms(s['same_task_median_s'])} | "
                     f"{fmt_ms(s['switch_median_s'])} | {s['extra_median_s'] * 1e3:+.3f} | "
                     f"{low * 1e3:+.3f}..{high * 1e3:+.3f} |")
    lines += ["", f"Switch: median over {next(iter(switch.values()))['rounds']} rounds of (the call right after a "
              "call with the other task - a call right after one with the same task)."]

    accuracy = results["accuracy"]
    lines += ["", "## Accuracy, int8 against fp32", ""]
    if "skipped" in accuracy:
        lines.append(f"Not measured: {accuracy['skipped']}.")
    else:
        lines += [f"Memories trained by `examples/glue_finetune.py` on {accuracy['backbone']}, exported with "
                  f"`export_onnx(quantize='int8')`; dev sets, max length {accuracy['max_length']}.", "",
                  "| task | examples | eager acc | ORT fp32 acc | ORT int8 acc | int8 - fp32 (points) | F1 fp32 / int8 "
                  "| int8 = fp32 predictions |", "|---|---:|---:|---:|---:|---:|---|---:|"]
        for task in ("sst2", "mrpc"):
            if task not in accuracy:
                continue
            r = accuracy[task]
            f1 = f"{r['fp32']['f1'] * 100:.2f} / {r['int8']['f1'] * 100:.2f}" if "f1" in r["fp32"] else "–"
            lines.append(f"| {task} | {r['examples']} | {r['eager']['accuracy'] * 100:.2f} | "
                         f"{r['fp32']['accuracy'] * 100:.2f} | {r['int8']['accuracy'] * 100:.2f} | "
                         f"{r['int8_minus_fp32_points']['accuracy']:+.2f} | {f1} | {r['int8_fp32_agreement']:.2%} |")

    lines += ["", "## Targets", "", "| target | wanted | measured | | note |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['wanted']} | {t['value']} | {fmt_met(t['met'])} | {t['note']} |")
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict, path: Path) -> None:
    """Horizontal bars: each method's overhead over its baseline per shape, 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = {n: m for n, m in results["methods"].items() if n != m["baseline"]}
    shapes = results["shapes"]
    fig, axis = plt.subplots(figsize=(10, 1 + 0.7 * len(methods)))
    names = list(methods)[::-1]
    height = 0.8 / len(shapes)
    for i, (shape_name, color) in enumerate(zip(shapes, ("tab:orange", "tab:red", "tab:blue"))):
        timings = [methods[n]["time"][shape_name] for n in names]
        values = [(t["ratio"] - 1) * 100 for t in timings]
        errors = [[(t["ratio"] - common.ratio_interval(t)[0]) * 100 for t in timings],
                  [(common.ratio_interval(t)[1] - t["ratio"]) * 100 for t in timings]]
        offsets = [j + (len(shapes) - 1 - 2 * i) * height / 2 for j in range(len(names))]
        axis.barh(offsets, values, height, xerr=errors, color=color, capsize=2,
                  label=shape_title(shape_name, shapes[shape_name]))
    axis.set_yticks(range(len(names)), [f"{methods[n]['label']} (vs {methods[n]['baseline']})" for n in names],
                    fontsize=8)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel("time overhead vs baseline (%), 95% interval")
    axis.legend(loc="lower right")
    axis.set_title(f"{results['model']} on ONNX Runtime CPU, {results['threads']} threads, medians of "
                   f"{results['latency_repeats']} (batch 1) and {results['repeats']} interleaved rounds", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda temporary: fig.savefig(temporary, dpi=120, format="png"))
    plt.close(fig)


def write_results(results: dict, args) -> None:
    stem = args.out / f"deploy_{results['model']}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(results, indent=2, allow_nan=False) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown(results))
    plotted = False
    if not args.no_plot:
        try:
            plot(results, stem.with_suffix(".png"))
            plotted = True
        except ImportError:
            print("matplotlib is not installed: no chart", flush=True)
    print(f"wrote {stem}.md / .json{' / .png' if plotted else ''}", flush=True)
    for t in results["targets"]:
        value = "" if t["met"] is None else f", {t['value']}"
        print(f"target {t['target']} ({t['wanted']}): {fmt_met(t['met'])}{value}"
              + (f" [{t['note']}]" if t["note"] else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
