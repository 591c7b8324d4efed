"""Where a spartan-wrapped model spends its time: torch.profiler over the whole model, then over one memory.

    python benchmarks/profile_spartan.py --model minilm          # inference b32 x 128 and a training step b16 x 128
    python benchmarks/profile_spartan.py --model bert-base --modes infer

Part 1 profiles the wrapped model and reports the share of the forward pass spent inside the
memories (each memory call is wrapped in a ``record_function`` range by hooks set here; spartan
itself is not changed) and in the layer hooks' residual add. Part 2 profiles one memory alone on
real hidden states captured from the model, forward (and backward in training), and lists its
operators by self CPU time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import spartan  # noqa: E402

MEMORY_RANGE = "spartan.memory"


def mark_memories(model: torch.nn.Module) -> list:
    """Wrap every memory call of the model in a profiler range."""
    handles = []
    for memory in spartan.get_memories(model):
        state = {}

        def enter(module, args, state=state):
            state["range"] = record_function(MEMORY_RANGE)
            state["range"].__enter__()

        def leave(module, args, output, state=state):
            state.pop("range").__exit__(None, None, None)

        handles += [memory.register_forward_pre_hook(enter), memory.register_forward_hook(leave)]
    return handles


def range_total_us(prof, name: str) -> float:
    return sum(e.cpu_time_total for e in prof.key_averages() if e.key == name)


def top_ops(prof, rows: int) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def whole_model(model, mode: str, sizes: common.Sizes, iterations: int) -> None:
    method = common.METHODS["spartan"]
    built = common.Built(model, lambda folder: None, 0)
    step = common.make_step(method, built, mode, sizes)
    step()  # warm-up
    handles = mark_memories(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            with record_function("step"):
                step()
    for handle in handles:
        handle.remove()
    total = range_total_us(prof, "step")
    memories = range_total_us(prof, MEMORY_RANGE)
    print(f"\n### whole model, {mode}: {total / iterations / 1e3:,.1f} ms per step; inside the memories' forward: "
          f"{memories / iterations / 1e3:,.1f} ms ({100 * memories / total:.2f}% of the step)")
    print(top_ops(prof, 15))


def one_memory(model, mode: str, sizes: common.Sizes, iterations: int) -> None:
    batch = common.mode_batch(model, mode, sizes)
    captured = {}
    memory = spartan.get_memories(model)[1]
    handle = memory.register_forward_pre_hook(lambda module, args: captured.setdefault("h", args[0].detach().clone()))
    with torch.inference_mode():
        model.eval()
        model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    hidden = captured["h"].clone()  # a normal tensor (outside inference mode)
    torch.nn.init.normal_(memory.child_values, std=0.02)
    train = mode == "train"

    def run():
        if train:
            h = hidden.detach().requires_grad_(True)
            out = memory(h, residual=h)
            out.backward(torch.ones_like(out))
        else:
            with torch.inference_mode():
                memory(hidden, residual=hidden)

    for _ in range(3):
        run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            with record_function("memory+residual"):
                run()
    total = range_total_us(prof, "memory+residual")
    print(f"\n### one memory alone ({memory.num_parents}x{memory.children_per_parent} top-{memory.top_k}, "
          f"{memory.implementation}), {'forward+backward' if train else 'forward'} on {tuple(hidden.shape)}: "
          f"{total / iterations / 1e3:,.2f} ms per call, residual add included")
    print(top_ops(prof, 20))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", choices=list(common.BACKBONES))
    parser.add_argument("--modes", default="infer_b32,train")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = common.QUICK_SIZES if args.quick else common.FULL_SIZES
    model = common.build_backbone(args.model, args.quick)
    spartan.wrap_model(model, spartan.SpartanConfig(**common.SPARTAN_PAPER))
    for mode in args.modes.split(","):
        whole_model(model, mode, sizes, args.iterations)
        one_memory(model, mode, sizes, 10 * args.iterations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
