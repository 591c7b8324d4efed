"""Dev-set accuracy of trained memories on ONNX Runtime under several dynamic 8-bit quantizations of
the exported backbone: which settings ``spartan.export.quantize_int8`` should use.

    .venv-bench/bin/python benchmarks/int8_variants.py --sst2-checkpoint runs/sst2-spartan/best \\
        --mrpc-checkpoint runs/mrpc-spartan/best --data-dir ../shared/glue_data

The two checkpoints (``examples/glue_finetune.py``'s) are loaded onto one all-MiniLM-L6-v2 and exported
once with ``spartan.export_onnx``; each variant re-quantizes the fp32 backbone graph with
``onnxruntime.quantization.quantize_dynamic`` and scores both dev sets one example at a time (each at
its own length, as a device serves them). Accuracy only: latency is ``deploy.py``'s. Writes
``results/deploy_int8_variants.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, when run as a script
import common  # noqa: E402

import spartan  # noqa: E402
from spartan import glue  # noqa: E402
from spartan._io import atomic_write_text  # noqa: E402
from spartan.export import QUANTIZED_OPS, quantize_int8  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# name -> quantize_dynamic settings (None: the library's quantize_int8)
VARIANTS = {
    "uint8, per tensor (the library's)": None,
    "int8 symmetric, per tensor": {"weight_type": "QInt8"},
    "int8 symmetric, per channel": {"weight_type": "QInt8", "per_channel": True},
    "int8 symmetric, reduce range": {"weight_type": "QInt8", "reduce_range": True},
    "int8 per channel, embeddings left fp32": {"weight_type": "QInt8", "per_channel": True, "ops": ["MatMul", "Gemm"]},
}


def quantize(source: Path, target: Path, settings: dict | None) -> None:
    if settings is None:
        quantize_int8(source, target)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = dict(settings)
    ops = settings.pop("ops", list(QUANTIZED_OPS))
    weight_type = getattr(QuantType, settings.pop("weight_type"))
    quantize_dynamic(str(source), str(target), weight_type=weight_type, op_types_to_quantize=ops, **settings)


def score(runtime: spartan.OnnxRuntimeModel, dev: dict) -> dict:
    scores = {}
    for name, (task, data) in dev.items():
        logits = []
        for example in tqdm(data, desc=name, leave=False):
            feeds = {k: np.asarray([example[k]], dtype=np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")
                     if k in example}
            logits.append(runtime(name, **feeds)[0])
        metrics = glue.compute_metrics(task, np.stack(logits), np.asarray(data["labels"]))
        scores[name] = {metric: round(100 * value, 2) for metric, value in metrics.items()}
    return scores


def markdown(results: dict) -> str:
    fp32 = results["graphs"]["fp32"]
    lines = [
        "# Dynamic 8-bit quantization of the exported backbone: dev-set accuracy",
        "",
        f"`{results['command']}`",
        "",
        "all-MiniLM-L6-v2 with the SST-2 and MRPC memories of `examples/glue_finetune.py`, exported once by "
        "`spartan.export_onnx`; each row re-quantizes the fp32 backbone graph (`quantize_dynamic`, activations "
        "quantized at run time) and scores the dev sets one example at a time on ONNX Runtime (CPU). Points "
        "against the fp32 graph in brackets. Accuracy only; latency: `deploy_minilm.md`.",
        "",
        "| graph | file MB | SST-2 accuracy | MRPC accuracy | MRPC F1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in results["graphs"].items():
        cells = [name, f"{row['file_bytes'] / 1e6:.1f}"]
        for task, metric in (("sst2", "accuracy"), ("mrpc", "accuracy"), ("mrpc", "f1")):
            value = row["scores"][task][metric]
            delta = "" if name == "fp32" else f" ({value - fp32['scores'][task][metric]:+.2f})"
            cells.append(f"{value:.2f}{delta}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sst2-checkpoint", type=Path, required=True)
    parser.add_argument("--mrpc-checkpoint", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    path = common.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    dev = {}
    for name, checkpoint in (("sst2", args.sst2_checkpoint), ("mrpc", args.mrpc_checkpoint)):
        try:
            spartan.load_memory(model, checkpoint, name=name)
        except (FileNotFoundError, ValueError) as error:
            parser.error(str(error))
        task = glue.get_task(name)
        split = glue.load_glue(task, data_dir=args.data_dir)[task.validation_split]
        dev[name] = (task, glue.tokenize_glue(split, tokenizer, task, 128))
    graphs = {}
    with tempfile.TemporaryDirectory(prefix="int8_variants_") as work:
        folder = spartan.export_onnx(model, Path(work) / "deploy", quantize="int8")
        fp32_graph, int8_graph = folder / "backbone.onnx", folder / "backbone.int8.onnx"
        graphs["fp32"] = {"file_bytes": fp32_graph.stat().st_size,
                          "scores": score(spartan.OnnxRuntimeModel(folder, graph="fp32", threads=args.threads), dev)}
        for name, settings in VARIANTS.items():
            quantize(fp32_graph, int8_graph, settings)
            runtime = spartan.OnnxRuntimeModel(folder, graph="int8", threads=args.threads)
            graphs[name] = {"settings": settings, "file_bytes": int8_graph.stat().st_size, "scores": score(runtime, dev)}
            print(name, graphs[name]["scores"], flush=True)
    command = "python benchmarks/int8_variants.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"command": command, "environment": common.environment(), "graphs": graphs}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "deploy_int8_variants.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(args.out / "deploy_int8_variants.md", markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
