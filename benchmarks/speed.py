"""Speed, memory and storage of spartan against the real peers, on CPU.

Per method: inference time at batch 32 x 128 tokens and at batch 1 x 128, the training step
(forward + backward + AdamW over the trainable parameters) at batch 16 x 128, the peak resident
memory of inference and of a training step (each in a fresh subprocess), the trainable parameters
and the bytes of one task's saved checkpoint.

All methods are built once in one process, over one shared copy of the frozen backbone's weights
(full fine-tuning and merged LoRA, which write them, get their own), and timed interleaved (round r
runs every method once, starting at a rotating offset); warm-up rounds are discarded; every time is
a median over the rounds, and every ratio is the median over rounds of (method / bare backbone in
the same round).

    python benchmarks/speed.py --model all            # writes benchmarks/results/speed_<model>.{md,json,png}
    python benchmarks/speed.py --quick --model bert-base --out /tmp/speed   # smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, when run as a script
import common  # noqa: E402

import spartan  # noqa: E402
from spartan._io import atomic_write, atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORKER_TAG = "SPEED_WORKER_RESULT "
MODE_TITLES = {"infer_b32": "inference b32", "infer_b1": "latency b1", "train": "train step b16"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="all", choices=[*common.BACKBONES, "all"])
    parser.add_argument("--methods", default=",".join(common.METHODS), help="comma-separated subset of: "
                        + ", ".join(common.METHODS) + " (bare is always added: ratios need it)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per mode (default 7; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds per mode before the timed ones")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, in every process")
    parser.add_argument("--modes", default=",".join(common.MODES), help="comma-separated subset of: "
                        + ", ".join(common.MODES))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tiny BERT, 16 tokens): a smoke test")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--jobs", type=int, default=1, help="peak-memory subprocesses run at once (they are "
                        "not timed; more than 1 only saves wall time on a machine with spare cores and memory)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md, .json and .png")
    # internal: one fresh process measuring one method's peak memory in one mode
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.jobs < 1:
        parser.error("--repeats, --threads and --jobs must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    common.import_peers()
    if args.worker:
        return worker(args)
    methods = select_methods(args.methods)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown_modes = set(modes) - set(common.MODES)
    if unknown_modes:
        sys.exit(f"error: unknown mode(s) {sorted(unknown_modes)}; choose from {', '.join(common.MODES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    models = list(common.BACKBONES) if args.model == "all" else [args.model]
    for model_name in models:
        results = run_model(model_name, methods, modes, args)
        write_results(results, args)
    return 0


def select_methods(spec: str) -> list[common.Method]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in common.METHODS]
    if unknown:
        sys.exit(f"error: unknown method(s) {unknown}; choose from {', '.join(common.METHODS)}")
    if "bare" not in names:
        names.insert(0, "bare")
    missing: dict[str, list[str]] = {}
    selected = []
    for name in common.METHODS:  # canonical order
        if name not in names:
            continue
        method = common.METHODS[name]
        if common.library_available(method.requires):
            selected.append(method)
        else:
            missing.setdefault(method.requires, []).append(name)
    for library, skipped in missing.items():
        print(
            f"skipping {', '.join(skipped)}: the `{library}` package is not installed "
            "(peers run in the benchmark environment, see benchmarks/README.md)",
            flush=True,
        )
    return selected


# -- the main process: build everything once, time interleaved --------------------------------------


def run_model(model_name: str, methods: list[common.Method], modes: list[str], args) -> dict:
    from tqdm.auto import tqdm

    sizes = common.QUICK_SIZES if args.quick else common.FULL_SIZES
    print(f"\n== {model_name}{' (quick)' if args.quick else ''}: building {len(methods)} methods", flush=True)
    backbone = common.build_backbone(model_name, args.quick)
    hidden = backbone.config.hidden_size
    num_layers = backbone.config.num_hidden_layers
    head_params = common.head_parameters(backbone)
    built: dict[str, common.Built] = {}
    info: dict[str, dict] = {}
    for method in tqdm(methods, desc="build + save", leave=False):
        # The frozen weights are shared (one copy in memory) by every method that does not write them:
        # with private copies, two identical bare BERT-base backbones once timed 10% apart.
        b = common.build_method(method, common.copy_backbone(backbone, share_weights=not method.writes_backbone))
        with tempfile.TemporaryDirectory(prefix=f"ckpt_{method.name}_") as folder:
            b.save(Path(folder))
            checkpoint = common.folder_bytes(Path(folder))
        built[method.name] = b
        info[method.name] = {
            "label": method.label,
            "library": method.requires or ("spartan" if method.name.startswith("spartan") else "transformers"),
            "trainable_params": b.trainable_params,
            "added_params_per_layer": (
                (b.trainable_params - head_params) / num_layers if method.name != "full" else None
            ),
            "checkpoint": checkpoint,
            "notes": b.notes,
            **b.extra,
        }
    del backbone
    gc.collect()

    timings: dict[str, dict] = {}
    for mode in modes:
        runnable = [m for m in methods if (m.train if mode == "train" else m.inference)]
        steps = {m.name: common.make_step(m, built[m.name], mode, sizes) for m in runnable}
        bar = tqdm(
            total=(args.warmup + args.repeats) * len(runnable), desc=f"{model_name} {MODE_TITLES[mode]}", leave=False
        )
        measured = common.interleaved_timings(steps, "bare", args.repeats, args.warmup, on_call=bar.update)
        bar.close()
        for name, timing in measured.items():
            timings.setdefault(name, {})[mode] = timing
        print(f"   {model_name} {MODE_TITLES[mode]}: " + ", ".join(
            f"{n} {timings[n][mode]['median_s'] * 1e3:.0f} ms ({common.fmt_overhead(timings[n][mode]['ratio'])})"
            for n in measured), flush=True)
        del steps
        gc.collect()
    del built
    gc.collect()

    memory: dict[str, dict] = {}
    if not args.no_memory:
        memory_modes = [mode for mode in ("infer_b32", "train") if mode in modes]
        jobs = [(m, mode) for m in methods for mode in memory_modes if (m.train if mode == "train" else m.inference)]
        with ThreadPoolExecutor(args.jobs) as pool:  # each job is a fresh subprocess
            futures = {pool.submit(run_worker, model_name, m.name, mode, args): (m, mode) for m, mode in jobs}
            for future in tqdm(as_completed(futures), total=len(jobs), desc=f"{model_name} peak memory", leave=False):
                method, mode = futures[future]
                memory.setdefault(method.name, {})[mode] = future.result()

    return {
        "model": model_name,
        "quick": args.quick,
        "hidden_size": hidden,
        "num_layers": num_layers,
        "head_params": head_params,
        "sizes": dataclasses.asdict(sizes),
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "environment": common.environment(),
        "methods": {m.name: {**info[m.name], "time": timings.get(m.name, {}), "memory": memory.get(m.name, {})}
                    for m in methods},
    }


def run_worker(model_name: str, method: str, mode: str, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model_name, "--method", method,
               "--mode", mode, "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(WORKER_TAG):
            return json.loads(line[len(WORKER_TAG):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    print(f"   peak-memory worker {method}/{mode} failed (exit {done.returncode}): {' | '.join(tail)}", flush=True)
    return {"error": " | ".join(tail)}


def worker(args) -> int:
    """One fresh process: build one method, reset the RSS high-water mark, run the mode, report the peak."""
    method = common.METHODS[args.method]
    sizes = common.QUICK_SIZES if args.quick else common.FULL_SIZES
    rss_start = common.current_rss_bytes()
    built = common.build_method(method, common.build_backbone(args.model, args.quick))
    step = common.make_step(method, built, args.mode, sizes)
    gc.collect()
    rss_built = common.current_rss_bytes()
    reset = common.reset_peak_rss()
    # the second training step runs with the optimizer state allocated
    for _ in range(2 if args.mode == "train" else 1):
        step()
    peak, source = common.peak_rss_bytes()
    if not reset:
        source += " (whole process, not reset after building)"
    result = {"rss_after_imports": rss_start, "rss_after_build": rss_built, "peak_rss": peak, "peak_source": source}
    print(WORKER_TAG + json.dumps(result), flush=True)
    return 0


# -- output ------------------------------------------------------------------------------------------


def fmt_mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def markdown(results: dict) -> str:
    sizes = results["sizes"]
    env = results["environment"]
    methods = results["methods"]
    lines = [
        f"# Speed, memory and storage: {results['model']}{' (quick smoke run)' if results['quick'] else ''}",
        "",
        f"CPU, {results['threads']} threads, {results['hidden_size']} hidden, {results['num_layers']} layers; "
        f"sequence length {sizes['seq_len']}; inference batch {sizes['infer_batch']} and {sizes['latency_batch']}, "
        f"training batch {sizes['train_batch']}. Methods interleaved, {results['warmup']} warm-up round(s) "
        f"discarded, medians over {results['repeats']} rounds; overhead = median over rounds of "
        "(method / bare backbone in the same round) - 1, in brackets its 95% bootstrap interval. The A/A row "
        "times a second copy of the bare backbone like any method: its overhead is the noise of the measurement.",
        f"torch {env['torch']}, transformers {env['transformers']}, adapters {env['adapters']}, peft {env['peft']}, "
        f"spartan {env['spartan']}; {env['processor']}, {env['platform']}.",
        "",
        "## Time",
        "",
        f"| method | inference b{sizes['infer_batch']} (ms) | overhead | seq/s "
        f"| latency b{sizes['latency_batch']} (ms) | overhead | train step b{sizes['train_batch']} (ms) | vs bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods.values():
        t = m["time"]
        cells = [m["label"]]
        for mode, batch in (("infer_b32", sizes["infer_batch"]), ("infer_b1", None), ("train", None)):
            if mode in t:
                cells += [f"{t[mode]['median_s'] * 1e3:,.1f}", common.fmt_overhead_interval(t[mode])]
                if batch:
                    cells.append(f"{batch / t[mode]['median_s']:.2f}")
            else:
                cells += ["–", "–"] + (["–"] if batch else [])
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "The bare backbone's training step trains only the classification head (a linear probe), so its "
        "backward pass stops at the head; every other method back-propagates through the whole backbone.",
        "",
        "## Memory and storage",
        "",
        "| method | trainable params | added per layer | checkpoint (bytes) | checkpoint | files | "
        "peak RSS inference (MB) | vs bare | peak RSS train (MB) | vs bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    bare_mem = methods["bare"]["memory"]
    for m in methods.values():
        ckpt = m["checkpoint"]
        per_layer = m["added_params_per_layer"]
        cells = [m["label"], f"{m['trainable_params']:,}", "–" if per_layer is None else f"{per_layer:,.0f}",
                 f"{ckpt['bytes']:,}", spartan.format_bytes(ckpt["bytes"]), str(ckpt["files"])]
        for mode in ("infer_b32", "train"):
            peak = m["memory"].get(mode, {}).get("peak_rss")
            bare_peak = bare_mem.get(mode, {}).get("peak_rss")
            cells.append(fmt_mb(peak))
            cells.append("–" if peak is None or bare_peak is None else f"{(peak - bare_peak) / 2**20:+,.0f} MB")
        lines.append("| " + " | ".join(cells) + " |")
    sources = {v.get("peak_source") for m in methods.values() for v in m["memory"].values() if "peak_source" in v}
    notes = [m for m in methods.values() if m["notes"] or m.get("bottleneck")]
    lines += [
        "",
        f"Peak RSS: high-water mark ({', '.join(sorted(s for s in sources if s)) or 'n/a'}) of a fresh process per "
        f"method and mode, reset after building the model, over one inference pass at batch "
        f"{sizes['infer_batch']} or two training steps at batch {sizes['train_batch']} (the second with the "
        "optimizer state allocated). Checkpoint: the folder written by the method's own save call "
        "(spartan.save_memory, adapters save_adapter + the head, peft save_pretrained, transformers "
        "save_pretrained), bytes of all files in it.",
        "",
    ]
    for m in notes:
        extra = f"bottleneck {m['bottleneck']}, reduction factor {m['reduction_factor']}" if m.get("bottleneck") else ""
        lines.append(f"- {m['label']}: {'; '.join(x for x in (m['notes'], extra) if x)}")
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict, path: Path) -> None:
    """Horizontal bars of every method's overhead per mode, with the 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = {n: m for n, m in results["methods"].items() if n != "bare"}
    panels = [("inference", ("infer_b32", "infer_b1"), ("tab:blue", "tab:orange")),
              ("training step (bare = head-only linear probe)", ("train",), ("tab:green",))]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=False)
    for axis, (title, modes, colors) in zip(axes, panels):
        names = [n for n in methods if any(mode in methods[n]["time"] for mode in modes)][::-1]  # top to bottom
        height = 0.8 / len(modes)
        for i, (mode, color) in enumerate(zip(modes, colors)):
            timings = [methods[n]["time"].get(mode) for n in names]
            values = [(t["ratio"] - 1) * 100 if t else float("nan") for t in timings]
            errors = [[(t["ratio"] - common.ratio_interval(t)[0]) * 100 if t else 0 for t in timings],
                      [(common.ratio_interval(t)[1] - t["ratio"]) * 100 if t else 0 for t in timings]]
            offsets = [j + (len(modes) - 1 - 2 * i) * height / 2 for j in range(len(names))]
            axis.barh(offsets, values, height, xerr=errors, color=color, label=MODE_TITLES[mode], capsize=2)
        axis.set_yticks(range(len(names)), [methods[n]["label"] for n in names], fontsize=8)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_xlabel("time overhead vs bare backbone (%), 95% interval")
        axis.set_title(title)
        axis.legend(loc="lower right")
    fig.suptitle(f"{results['model']}: overhead over the frozen backbone, CPU {results['threads']} threads, "
                 f"median of {results['repeats']} interleaved rounds")
    fig.tight_layout()
    atomic_write(path, lambda temporary: fig.savefig(temporary, dpi=120, format="png"))
    plt.close(fig)


def write_results(results: dict, args) -> None:
    stem = args.out / f"speed_{results['model']}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown(results))
    if not args.no_plot:
        try:
            plot(results, stem.with_suffix(".png"))
        except ImportError:
            print("matplotlib is not installed: no chart", flush=True)
    print(f"wrote {stem}.md / .json{'' if args.no_plot else ' / .png'}", flush=True)
    print(markdown(results), flush=True)


if __name__ == "__main__":
    sys.exit(main())
