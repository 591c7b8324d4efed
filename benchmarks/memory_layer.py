"""The memory layer alone, up to large memories: time, gradient bytes and peak memory of spartan's dense,
sparse and product-key reads, lucidrains' ``product-key-memory``, an arithmetic floor, one BERT-base
layer, and one training step with the optimizer.

    python benchmarks/memory_layer.py                        # the full sweep, 48 to 1,048,576 slots
    python benchmarks/memory_layer.py --max-slots 4096       # a quick look
    python benchmarks/memory_layer.py --only product,pkm --max-slots 65536
    python benchmarks/memory_layer.py --quick --output /tmp/m  # smoke run: tiny sizes, 2 rounds

Tokens: batch 32 x 128 at hidden size 768 (BERT-base), 2 threads. At each slot count the variants are
grouped into jobs, and each job times its variants, the arithmetic floor of each, and one BERT-base
layer in interleaved rounds (medians; per-round ratios with 95% bootstrap intervals):

- ``dense``, ``sparse``: flat parent keys, the dense and the sparse implementation (the shapes of
  ``results/memory_layer.md``: the paper's 16 x 3 at 48 slots, else P near sqrt(top_k * slots));
- ``product``, ``product_dense_grads``: product parent keys (P = n * n), the sparse implementation, with
  sparse gradients and with dense ones (one memory, its ``sparse_gradients`` switched per call);
- ``product_dense``: product parent keys read by the dense implementation (every child scored);
- ``pkm``: ``product_key_memory.PKM`` 0.3.0 (its defaults: 4 heads, top-32 each, so 128 values per token,
  as many as spartan's top-8 x 16 children), when the package is installed;
- ``step_adamw``, ``step_lazyadamw``: forward, backward and an optimizer step of a product-key memory,
  ``torch.optim.AdamW`` on dense gradients against ``spartan.training.optim.LazyAdamW`` on sparse ones.

The arithmetic floor of a variant is one plain ``torch.mm`` with the multiply-adds its read needs per
token: ``[tokens, H] @ [H, M]``, M = multiply-adds per token / H (dense: P + 2 P C; sparse: P + 2 k C;
product keys: n + 2 k C, read densely n + 2 P C; pkm: its query projection, sub-key scores and k values per head).

Every job runs in a fresh worker process started with ``MALLOC_MMAP_THRESHOLD_`` set, so that freed
tensors go back to the system and each call's peak shows in the resident set (Linux: VmHWM reset
through /proc/self/clear_refs); jobs estimated under 1 GiB share one worker. A job whose memory,
estimated from the shapes, exceeds ``--memory-gib`` is split into one job per variant; a variant that
still does not fit is reported as such, with what it needs, and not run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, when run as a script

from spartan import SparseHierarchicalMemory  # noqa: E402
from spartan.memory import GRADIENT_BLOCK_BYTES  # noqa: E402
from spartan import _validate as check  # noqa: E402
from spartan._io import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SLOT_COUNTS = (48, 1024, 4096, 16384, 65536, 262144, 1048576)
PKM_SLOTS = (65536, 1048576)
TRAIN_SLOTS = (65536, 262144, 1048576)
QUICK = {"slots": (48, 1024, 4096), "pkm_slots": (1024, 4096), "train_slots": (4096,), "hidden": 64, "batch": 2,
         "length": 16, "rounds": 2, "heavy_rounds": 2}
TEMPERATURE = 1.6
LEARNING_RATE, WEIGHT_DECAY = 1e-3, 0.01
PKM = {"heads": 4, "topk": 32, "dim_head": 128}  # product_key_memory.PKM's defaults
HEAVY_SLOTS = 65536  # rows above this many slots run --heavy-rounds rounds
TRAFFIC_CHUNK_ROWS = 4096  # rows the traffic floor gathers per index_select, into one reused buffer
LIGHT_JOB_BYTES = 2**30  # jobs estimated under this share one worker
HEADROOM_BYTES = 2 * 2**30  # --memory-gib defaults to the machine's RAM less this
ALLOWANCE_BYTES = 512 * 2**20  # the BERT layer, its activations, the interpreter
CHOICES = {"dense": ("dense",), "sparse": ("sparse",), "product": ("product", "product_dense_grads"),
           "product_dense": ("product_dense",), "pkm": ("pkm",), "train": ("step_adamw", "step_lazyadamw")}
JOB_GROUPS = {"flat": ("dense", "sparse"), "product": ("product", "product_dense_grads", "product_dense", "pkm"),
              "train": ("step_adamw", "step_lazyadamw")}
LABELS = {"dense": "spartan dense", "sparse": "spartan sparse", "product": "spartan product keys, sparse grads",
          "product_dense_grads": "spartan product keys, dense grads",
          "product_dense": "spartan product keys, dense read", "pkm": "product-key-memory 0.3.0",
          "step_adamw": "product keys, dense grads, AdamW", "step_lazyadamw": "product keys, sparse grads, LazyAdamW"}
WORKER_FLAG = "--worker"


# -- shapes, multiply-adds, memory estimates ------------------------------------------------------------


def flat_shape(slots: int, top_k: int) -> tuple[int, int]:
    """Parents and children per parent of a flat-key memory of ``slots`` cells: the paper's 16 x 3 at 48
    slots, otherwise P near sqrt(top_k * slots), which keeps P + top_k * C (keys per token) smallest."""
    if slots == 48:
        return 16, 3
    parents = 2 ** round(math.log2(math.sqrt(top_k * slots)))
    return parents, slots // parents


def product_shape(slots: int) -> tuple[int, int]:
    """Parents (a square n * n) and children of a product-key memory: 4^2 x 3 at 48 slots, otherwise 16
    children per parent (65,536 slots: 64^2 x 16; 1,048,576: 256^2 x 16)."""
    parents, children = (16, 3) if slots == 48 else (slots // 16, 16)
    if math.isqrt(parents) ** 2 != parents or parents * children != slots:
        raise ValueError(f"no product-key shape for {slots} slots: use a slot count 16 * n * n")
    return parents, children


def variant_spec(name: str, slots: int, settings: dict) -> dict:
    """What a worker builds for one variant, and its shape."""
    top_k = settings["top_k"]
    if name == "pkm":
        return {"name": name, "kind": "pkm", "slots": slots, "num_keys": math.isqrt(slots), **PKM,
                "shape": f"{math.isqrt(slots)}^2 keys, {PKM['heads']} heads x top-{PKM['topk']}"}
    if name in ("dense", "sparse"):
        parents, children = flat_shape(slots, top_k)
        return {"name": name, "kind": "spartan", "slots": slots, "parents": parents, "children": children,
                "top_k": top_k, "parent_keys": "flat", "implementation": name, "sparse_gradients": False,
                "module": name, "shape": f"{parents:,} x {children}"}
    parents, children = product_shape(slots)
    sparse_gradients = name in ("product", "step_lazyadamw")
    implementation = "dense" if name == "product_dense" else "sparse"
    spec = {"name": name, "kind": "spartan", "slots": slots, "parents": parents, "children": children, "top_k": top_k,
            "parent_keys": "product", "implementation": implementation, "sparse_gradients": sparse_gradients,
            "module": "product" if name in ("product", "product_dense_grads") else name,
            "shape": f"{math.isqrt(parents)}^2 x {children}"}
    if name.startswith("step_"):
        spec["optimizer"] = "AdamW" if name == "step_adamw" else "LazyAdamW"
    return spec


def parameter_count(spec: dict, hidden: int) -> int:
    if spec["kind"] == "pkm":
        queries = hidden * spec["dim_head"] * spec["heads"] * 2
        keys = spec["heads"] * spec["num_keys"] * 2 * spec["dim_head"]
        return queries + keys + 2 * spec["dim_head"] + spec["num_keys"] ** 2 * hidden
    return SparseHierarchicalMemory.parameter_count(hidden, spec["parents"], spec["children"], spec["parent_keys"])


def macs_per_token(spec: dict, hidden: int) -> int:
    """Multiply-adds one token's read needs: scoring the keys it compares against and mixing the values."""
    if spec["kind"] == "pkm":
        heads, dim_head = spec["heads"], spec["dim_head"]
        return hidden * 2 * heads * dim_head + heads * 2 * spec["num_keys"] * dim_head + heads * spec["topk"] * hidden
    P, C, k = spec["parents"], spec["children"], spec["top_k"]
    parent_scores = P * hidden if spec["parent_keys"] == "flat" else math.isqrt(P) * hidden  # two halves of H/2
    if spec["implementation"] == "dense":
        return parent_scores + 2 * P * C * hidden
    return parent_scores + 2 * k * C * hidden


def floor_width(spec: dict, hidden: int) -> int:
    """M of the floor's ``[tokens, H] @ [H, M]``."""
    return -(-macs_per_token(spec, hidden) // hidden)


def memory_estimate(spec: dict, settings: dict) -> tuple[int, int]:
    """Bytes a variant holds for the whole job (parameters, optimizer moments, its floor's matrices) and
    bytes one call adds at its peak (gradients, activations), estimated from the shapes (fp32)."""
    hidden, tokens = settings["hidden"], settings["batch"] * settings["length"]
    params = 4 * parameter_count(spec, hidden)
    floor = 4 * (hidden + tokens) * floor_width(spec, hidden)
    if spec["kind"] == "pkm":  # dense gradients; the sub-key scores, their top-k and gradients
        scores = 4 * 4 * tokens * spec["heads"] * 2 * spec["num_keys"]
        return params + floor, params + 2 * scores + 4 * tokens * hidden * PKM["topk"]
    rows = 4 * min(tokens * spec["top_k"], spec["parents"]) * spec["children"] * hidden  # one table's rows read
    if spec["implementation"] == "dense":
        transient = params + 4 * 5 * tokens * spec["slots"]  # logits, child and slot weights, their gradients
    elif spec["sparse_gradients"]:
        # both tables' gradient rows (+ a block buffer each, parent by parent)
        transient = 2 * rows + 2 * GRADIENT_BLOCK_BYTES
    else:
        transient = params + 2 * GRADIENT_BLOCK_BYTES  # the gradients, written a block at a time
    if spec.get("optimizer") == "AdamW":  # two moments; a step's temporary of the largest table
        return params + 2 * params, transient + 4 * spec["slots"] * hidden
    if spec.get("optimizer") == "LazyAdamW":  # two moments; the gradients and the rows' temporaries
        return params + 2 * params, 7 * rows
    return params + floor, transient


def job_estimate(specs: list[dict], settings: dict) -> int:
    """Peak bytes of a job: what every module holds (a shared module once) and the largest call."""
    held, peaks = {}, []
    for spec in specs:
        resident, transient = memory_estimate(spec, settings)
        key = spec.get("module", spec["name"])
        held[key] = max(held.get(key, 0), resident)
        if key != spec["name"]:  # a shared module: each variant adds its own floor
            held[spec["name"]] = 4 * (settings["hidden"] + settings["batch"] * settings["length"]) * floor_width(
                spec, settings["hidden"])
        peaks.append(transient)
    return sum(held.values()) + max(peaks) + ALLOWANCE_BYTES


def machine_ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- planning -----------------------------------------------------------------------------------------


def plan(args: argparse.Namespace, settings: dict, pkm_available: bool) -> tuple[list[dict], list[dict]]:
    """The jobs to run and the rows decided without running (skipped, does not fit)."""
    wanted = {variant for choice in args.only for variant in CHOICES[choice]}
    tokens = settings["batch"] * settings["length"]
    budget = args.memory_gib * 2**30
    jobs, decided = [], []
    for slots in [s for s in settings["slots"] if s <= args.max_slots]:
        for group, names in JOB_GROUPS.items():
            specs = []
            for name in [n for n in names if n in wanted]:
                if name == "pkm" and slots not in settings["pkm_slots"]:
                    continue
                if name.startswith("step_") and slots not in settings["train_slots"]:
                    continue
                spec = variant_spec(name, slots, settings)
                if name == "pkm" and not pkm_available:
                    decided.append(row_stub(spec, settings, "skipped", "product-key-memory is not installed "
                                            "(.venv-bench/bin/pip install --no-deps product-key-memory==0.3.0)"))
                    continue
                dense_bytes = 4 * tokens * slots * 5
                if spec.get("implementation") == "dense" and dense_bytes > args.dense_limit_gib * 2**30:
                    decided.append(row_stub(spec, settings, "skipped", f"needs ~{dense_bytes / 2**30:.0f} GiB of "
                                            f"activations (over --dense-limit-gib {args.dense_limit_gib:g})"))
                    continue
                specs.append(spec)
            if not specs:
                continue
            if job_estimate(specs, settings) <= budget:
                jobs.append(make_job(slots, group, specs, settings))
                continue
            for spec in specs:  # too large together: one job each
                need = job_estimate([spec], settings)
                if need <= budget:
                    jobs.append(make_job(slots, group, [spec], settings))
                else:
                    ram = machine_ram_bytes()
                    ram_text = f" of {ram / 2**30:.0f} GiB RAM" if ram else ""
                    decided.append(row_stub(spec, settings, "does not fit", (
                        f"does not fit in {args.memory_gib:.1f} GiB{ram_text} (needs ~{need / 2**30:.1f} GiB, "
                        "estimated from the shapes)"), need))
    return jobs, decided


def make_job(slots: int, group: str, specs: list[dict], settings: dict) -> dict:
    rounds = settings["rounds"] if slots <= HEAVY_SLOTS else settings["heavy_rounds"]
    return {"slots": slots, "group": group, "variants": specs, "rounds": rounds,
            "estimated_bytes": job_estimate(specs, settings)}


def row_stub(spec: dict, settings: dict, status: str, note: str | None, estimated_bytes: int | None = None) -> dict:
    return {"slots": spec["slots"], "variant": spec["name"], "label": LABELS[spec["name"]], "shape": spec["shape"],
            "spec": spec, "parameters": parameter_count(spec, settings["hidden"]), "status": status, "note": note,
            "estimated_gib": None if estimated_bytes is None else estimated_bytes / 2**30}


def workers_for(jobs: list[dict]) -> list[list[dict]]:
    """Light jobs share the first worker; each heavier one gets a fresh process of its own."""
    light = [job for job in jobs if job["estimated_bytes"] < LIGHT_JOB_BYTES]
    heavy = [[job] for job in jobs if job["estimated_bytes"] >= LIGHT_JOB_BYTES]
    return ([light] if light else []) + heavy


def run_workers(workers: list[list[dict]], settings: dict, rows: list[dict], report) -> list[dict]:
    """Each list of jobs in a fresh process, its rows appended to ``rows`` and ``report(rows)`` called after
    each worker; a job whose worker died becomes a ``failed`` row per variant."""
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    with tempfile.TemporaryDirectory(prefix="memory_layer_") as folder:
        for index, jobs in enumerate(workers):
            names = ", ".join(f"{job['slots']:,} {job['group']}" for job in jobs)
            gib = max(job["estimated_bytes"] for job in jobs) / 2**30
            print(f"[worker {index + 1}/{len(workers)}] {names} (estimated peak {gib:.1f} GiB)", file=sys.stderr,
                  flush=True)
            request, output = Path(folder) / f"jobs{index}.json", Path(folder) / f"rows{index}.json"
            atomic_write_text(request, json.dumps({"settings": settings, "jobs": jobs}))
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, str(request),
                                   str(output)], env=environment)
            finished = json.loads(output.read_text()) if output.exists() else []
            rows += [row for job_rows in finished for row in job_rows]
            if done.returncode != 0:
                reason = (f"worker killed by signal {-done.returncode} (out of memory?)" if done.returncode < 0
                          else f"worker failed (exit code {done.returncode}; its error is printed above)")
                for job in jobs[len(finished):]:
                    rows += [row_stub(spec, settings, "failed", reason, job["estimated_bytes"])
                             for spec in job["variants"]]
            report(rows)
    return rows


# -- the worker -----------------------------------------------------------------------------------------


def worker_main(request: Path, output: Path) -> None:
    import torch

    payload = json.loads(request.read_text())
    settings = payload["settings"]
    torch.set_num_threads(settings["threads"])
    results = []
    for job in payload["jobs"]:
        results.append(run_job(job, settings))
        atomic_write_text(output, json.dumps(results))
        print(f"  done: {job['slots']:,} slots, {job['group']}", file=sys.stderr, flush=True)


def bert_layer(hidden: int):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    config = BertConfig() if hidden == 768 else BertConfig(hidden_size=hidden, num_attention_heads=2,
                                                            intermediate_size=4 * hidden)
    # eager attention, set explicitly: transformers 4.57 cannot build a standalone layer without it, and 5.x
    # falls back to it (the layer of results/memory_layer.md)
    config._attn_implementation = "eager"
    return BertLayer(config)


def build_module(spec: dict, hidden: int):
    import torch

    torch.manual_seed(0)
    if spec["kind"] == "pkm":
        from product_key_memory import PKM as ProductKeyMemory

        return ProductKeyMemory(hidden, heads=spec["heads"], num_keys=spec["num_keys"], topk=spec["topk"],
                                dim_head=spec["dim_head"])
    return SparseHierarchicalMemory(
        hidden, spec["parents"], spec["children"], spec["top_k"], TEMPERATURE, value_init="normal",
        implementation=spec["implementation"], parent_keys=spec["parent_keys"],
        sparse_gradients=spec["sparse_gradients"],
    )


def first(output):
    return output[0] if isinstance(output, tuple) else output


def forward_call(module, hidden, spec: dict | None = None):
    import torch

    def run():
        if spec is not None and spec["kind"] == "spartan":
            module.sparse_gradients = spec["sparse_gradients"]
        with torch.no_grad():
            module(hidden)

    return run


def backward_call(module, hidden, spec: dict | None = None, keep_gradients: bool = False):
    """Forward and backward; the memory's gradients are dropped at the end unless ``keep_gradients``
    (interleaved variants then never hold gradients at once)."""

    def run():
        if spec is not None and spec["kind"] == "spartan":
            module.sparse_gradients = spec["sparse_gradients"]
        module.zero_grad(set_to_none=True)
        first(module(hidden)).sum().backward()
        if spec is not None and not keep_gradients:
            module.zero_grad(set_to_none=True)

    return run


def step_call(module, hidden, optimizer):
    def run():
        module.zero_grad(set_to_none=True)
        module(hidden).sum().backward()
        optimizer.step()
        module.zero_grad(set_to_none=True)

    return run


def floor_call(tokens, width: int):
    """One plain ``torch.mm`` of ``[tokens, H] @ [H, width]`` into a preallocated output."""
    import torch

    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(tokens.shape[1], width, generator=generator)
    out = torch.empty(len(tokens), width)

    def run():
        torch.mm(tokens, matrix, out=out)

    return run


def traffic_floor_call(module, hidden):
    """The memory traffic of a sparse read with none of its arithmetic: each distinct child row that the
    read of ``hidden`` touches (its tokens' top-k parents x C children, of the keys and of the values),
    once, in ascending order, gathered with ``index_select`` into one reused buffer of
    ``TRAFFIC_CHUNK_ROWS`` rows (its writes stay in that buffer): what moving these rows costs, about
    the least traffic any read of them needs. Returns the call and its sizes (the rows the read touches
    with repeats, the distinct rows, their bytes)."""
    import torch

    with torch.no_grad():
        module(hidden)
    P, C = module.num_parents, module.children_per_parent
    parents = module.last_routing.indices.reshape(-1)
    touched = (parents.unsqueeze(1) + P * torch.arange(C)).reshape(-1)  # child-major rows, with repeats
    rows = touched.unique()  # sorted
    child_keys = module.keys if module.sub_keys is not None else module.keys[P:]
    tables = [child_keys.detach(), module.values.detach()]
    chunks = rows.split(TRAFFIC_CHUNK_ROWS)
    buffer = tables[0].new_empty(TRAFFIC_CHUNK_ROWS, hidden.shape[-1])

    def run():
        for table in tables:
            for chunk in chunks:
                torch.index_select(table, 0, chunk, out=buffer[: len(chunk)])

    sizes = {"rows": 2 * touched.numel(), "distinct_rows": 2 * rows.numel(),
             "distinct_bytes": 2 * rows.numel() * hidden.shape[-1] * tables[0].element_size()}
    return run, sizes


def gradient_bytes(module) -> dict[str, int]:
    """Bytes of each parameter's gradient as it stands: a dense one's elements, a sparse one's values and indices."""
    written = {}
    for name, parameter in module.named_parameters():
        grad = parameter.grad
        if grad is None:
            continue
        if grad.is_sparse:
            grad = grad.coalesce()
            written[name] = (grad.values().numel() * grad.values().element_size()
                             + grad.indices().numel() * grad.indices().element_size())
        else:
            written[name] = grad.numel() * grad.element_size()
    return written


def round_ratio(times: list[float], baselines: list[float]) -> float:
    """The median over rounds of time / baseline in the same round."""
    return statistics.median(t / b for t, b in zip(times, baselines))


def timing_entry(timing: dict, tokens: int) -> dict:
    return {"ms": 1000 * timing["median_s"], "us_per_token": 1e6 * timing["median_s"] / tokens,
            "vs_bert_layer": timing["ratio"], "vs_bert_layer_ci95": list(timing["ratio_ci95"]),
            "times_s": timing["times_s"]}


def run_job(job: dict, settings: dict) -> list[dict]:
    import gc

    import torch

    import common

    hidden_size = settings["hidden"]
    torch.manual_seed(0)
    layer = bert_layer(hidden_size)
    hidden = torch.randn(settings["batch"], settings["length"], hidden_size)
    trainable_hidden = hidden.detach().requires_grad_(True)
    tokens = hidden.shape[0] * hidden.shape[1]
    specs = job["variants"]
    modules = {}
    for spec in specs:
        key = spec.get("module", spec["name"])
        if key not in modules:
            modules[key] = build_module(spec, hidden_size)
    module_of = {spec["name"]: modules[spec.get("module", spec["name"])] for spec in specs}
    rows = {spec["name"]: {**row_stub(spec, settings, "measured", None, job["estimated_bytes"]),
                           "rounds": job["rounds"]} for spec in specs}
    reads = [spec for spec in specs if not spec["name"].startswith("step_")]
    steps = [spec for spec in specs if spec["name"].startswith("step_")]
    bert = {}

    if reads:
        # forward: every read, its floor and the BERT layer (eval: no dropout), interleaved
        layer.eval()
        flat_tokens = hidden.reshape(-1, hidden_size)
        calls = {"bert_layer": forward_call(layer, hidden)}
        traffic = {}  # module key -> its traffic floor's sizes (one per module: its variants read the same rows)
        for spec in reads:
            calls[spec["name"]] = forward_call(module_of[spec["name"]], hidden, spec)
            calls[f"floor:{spec['name']}"] = floor_call(flat_tokens, floor_width(spec, hidden_size))
            key = spec.get("module", spec["name"])
            if spec["kind"] == "spartan" and spec["implementation"] == "sparse" and key not in traffic:
                calls[f"traffic:{key}"], traffic[key] = traffic_floor_call(module_of[spec["name"]], hidden)
        timings = common.interleaved_timings(calls, "bert_layer", job["rounds"])
        bert["forward_ms"] = 1000 * timings["bert_layer"]["median_s"]
        for spec in reads:
            name, floor = spec["name"], timings[f"floor:{spec['name']}"]
            width = floor_width(spec, hidden_size)
            rows[name]["floor"] = {
                "macs_per_token": macs_per_token(spec, hidden_size), "mm": [tokens, hidden_size, width],
                "ms": 1000 * floor["median_s"], "gflops": 2 * tokens * hidden_size * width / floor["median_s"] / 1e9,
                "vs_bert_layer": floor["ratio"],
            }
            key = spec.get("module", name)
            if key in traffic:
                moved = timings[f"traffic:{key}"]
                rows[name]["traffic_floor"] = {
                    **traffic[key], "ms": 1000 * moved["median_s"], "vs_bert_layer": moved["ratio"],
                    "distinct_gb_per_s": traffic[key]["distinct_bytes"] / moved["median_s"] / 1e9,
                }
            entry = timing_entry(timings[name], tokens)
            entry["vs_floor"] = round_ratio(timings[name]["times_s"], floor["times_s"])
            if key in traffic:
                entry["vs_traffic_floor"] = round_ratio(timings[name]["times_s"], timings[f"traffic:{key}"]["times_s"])
            if "pkm" in calls and name != "pkm":
                entry["vs_pkm"] = round_ratio(timings[name]["times_s"], timings["pkm"]["times_s"])
            entry["peak_mib"] = common.peak_added_bytes(calls[name]) / 2**20
            rows[name]["forward"] = entry
        del calls, timings
        gc.collect()

        # forward and backward: the BERT layer in train mode (dropout), as in fine-tuning
        layer.train()
        calls = {"bert_layer": backward_call(layer, trainable_hidden)}
        for spec in reads:
            calls[spec["name"]] = backward_call(module_of[spec["name"]], trainable_hidden, spec)
        timings = common.interleaved_timings(calls, "bert_layer", job["rounds"])
        bert["forward_backward_ms"] = 1000 * timings["bert_layer"]["median_s"]
        layer.zero_grad(set_to_none=True)
        for spec in reads:
            name, module = spec["name"], module_of[spec["name"]]
            entry = timing_entry(timings[name], tokens)
            entry["vs_own_forward"] = entry["ms"] / rows[name]["forward"]["ms"]
            if "pkm" in calls and name != "pkm":
                entry["vs_pkm"] = round_ratio(timings[name]["times_s"], timings["pkm"]["times_s"])
            peak = common.peak_added_bytes(backward_call(module, trainable_hidden, spec, keep_gradients=True))
            written = gradient_bytes(module)
            module.zero_grad(set_to_none=True)
            entry |= {"gradient_bytes": sum(written.values()), "gradient_bytes_by_parameter": written,
                      "peak_mib": peak / 2**20, "peak_beyond_gradients_mib": (peak - sum(written.values())) / 2**20}
            rows[name]["forward_backward"] = entry
        del calls, timings
        gc.collect()

    if steps:
        layer.train()
        optimizers = {}
        for spec in steps:
            module = module_of[spec["name"]]
            kind = torch.optim.AdamW
            if spec["optimizer"] == "LazyAdamW":
                from spartan.training.optim import LazyAdamW as kind
            optimizers[spec["name"]] = kind(module.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        calls = {"bert_layer": backward_call(layer, trainable_hidden)}
        calls |= {spec["name"]: step_call(module_of[spec["name"]], trainable_hidden, optimizers[spec["name"]])
                  for spec in steps}
        timings = common.interleaved_timings(calls, "bert_layer", job["rounds"])  # warm-up allocates the moments
        bert["forward_backward_ms"] = 1000 * timings["bert_layer"]["median_s"]
        for spec in steps:
            name, module, optimizer = spec["name"], module_of[spec["name"]], optimizers[spec["name"]]
            entry = timing_entry(timings[name], tokens)
            entry["vs_bert_layer_forward_backward"] = entry.pop("vs_bert_layer")
            entry["vs_bert_layer_forward_backward_ci95"] = entry.pop("vs_bert_layer_ci95")
            entry["peak_mib"] = common.peak_added_bytes(calls[name]) / 2**20  # moments already allocated
            module.zero_grad(set_to_none=True)
            first(module(trainable_hidden)).sum().backward()
            written = gradient_bytes(module)
            optimizer.step()
            module.zero_grad(set_to_none=True)
            state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                        if torch.is_tensor(t))
            entry |= {"optimizer": spec["optimizer"], "gradient_bytes": sum(written.values()),
                      "gradient_bytes_by_parameter": written, "optimizer_state_bytes": state}
            rows[name]["step"] = entry

    for spec in specs:
        name = spec["name"]
        rows[name]["parameters"] = sum(p.numel() for p in module_of[name].parameters())
        rows[name]["parameter_bytes"] = sum(p.numel() * p.element_size() for p in module_of[name].parameters())
        rows[name]["bert_layer"] = dict(bert)
        rows[name]["job"] = f"{job['slots']} {job['group']}"
    return list(rows.values())


# -- targets ------------------------------------------------------------------------------------------


def find(rows: list[dict], variant: str, slots: int) -> dict | None:
    for row in rows:
        if row["variant"] == variant and row["slots"] == slots and row["status"] == "measured":
            return row
    return None


def today_baseline() -> dict | None:
    """The paper-size dense row of ``results/memory_layer.json`` (the table before large memories)."""
    try:
        rows = json.loads((RESULTS / "memory_layer.json").read_text())
    except (OSError, ValueError):
        return None
    for row in rows:
        if row.get("slots") == 48 and isinstance(row.get("dense"), dict):
            return row["dense"]
    return None


def targets(rows: list[dict], settings: dict) -> list[dict]:
    """The issue's targets, each met, missed or not measured, with its number."""
    full = settings["hidden"] == 768 and settings["batch"] * settings["length"] == 4096 and settings["top_k"] == 8
    big = 1048576
    product, pkm, flat = find(rows, "product", big), find(rows, "pkm", big), find(rows, "sparse", big)
    dense = find(rows, "dense", 48)
    today = today_baseline()
    out = []

    def add(name: str, value: float | None, met: bool | None, text: str, needs: str) -> None:
        if value is None or not full:
            why = "not measured at the target's shape (H=768, 32 x 128 tokens, top-8)" if not full else needs
            out.append({"target": name, "status": "not measured", "value": None, "line": f"{name}: {why}"})
            return
        status = "met" if met else "missed"
        out.append({"target": name, "status": status, "value": value, "line": f"{name}: {status} ({text})"})

    shape = "1,048,576-slot product-key memory (256^2 x 16, top-8)"
    value = product and product["forward"]["vs_bert_layer"]
    text = f"{100 * value:.1f}% of the layer's forward" if value is not None else ""
    if value is not None and "traffic_floor" in product:
        text += f"; gathering the rows it reads alone: {100 * product['traffic_floor']['vs_bert_layer']:.1f}%"
    add(f"{shape}: forward <= 40% of a BERT-base layer", value, value is not None and value <= 0.40, text,
        "needs the product row at 1,048,576")
    value = product and product["forward_backward"]["vs_own_forward"]
    add(f"{shape}: forward+backward <= 3x its forward", value, value is not None and value <= 3,
        f"{value:.2f}x" if value is not None else "", "needs the product row at 1,048,576")
    value = product and product["forward_backward"]["peak_beyond_gradients_mib"]
    add(f"{shape}: fwd+bwd peak < 200 MiB beyond parameters and gradients", value, value is not None and value < 200,
        f"{value:.0f} MiB beyond its {product['forward_backward']['gradient_bytes'] / 2**20:.0f} MiB of gradients"
        if value is not None else "", "needs the product row at 1,048,576")
    value = product and pkm and product["forward_backward"].get("vs_pkm")
    add(f"{shape}: fwd+bwd per token below product-key-memory's, same run", value, value is not None and value < 1,
        f"{product['forward_backward']['us_per_token']:.1f} against {pkm['forward_backward']['us_per_token']:.1f} "
        f"us per token, {value:.2f}x per round" if value is not None else "",
        "needs the product and pkm rows at 1,048,576 (product-key-memory installed)")
    value = flat and flat["forward"]["vs_floor"]
    add("4,096 x 256 flat memory (1,048,576 slots): forward <= 2x its arithmetic floor", value,
        value is not None and value <= 2,
        f"{value:.2f}x the floor ({flat['forward']['ms']:.0f} against {flat['floor']['ms']:.0f} ms)"
        if value is not None else "", "needs the sparse row at 1,048,576")
    if dense is not None and today is not None:
        now = dense["forward"]["vs_bert_layer"], dense["forward_backward"]["vs_bert_layer"]
        before = today["forward_vs_bert_layer"], today["forward_backward_vs_bert_layer"]
        value, met = now[0], now[0] <= before[0] and now[1] <= before[1]
        text = (f"forward {100 * now[0]:.2f}% of the BERT layer, results/memory_layer.json {100 * before[0]:.2f}%; "
                f"fwd+bwd {100 * now[1]:.2f}% against {100 * before[1]:.2f}%")
    else:
        value, met, text = None, None, ""
    add("The paper's 16 x 3 dense memory: no slower than today", value, met, text,
        "needs the dense row at 48 slots and results/memory_layer.json")
    return out


# -- output -------------------------------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**20:,.1f}"


def markdown(results: dict) -> str:
    settings, meta = results["settings"], results["meta"]
    rows = sorted(results["rows"], key=lambda r: (r["slots"], list(LABELS).index(r["variant"])))
    tokens = settings["batch"] * settings["length"]
    lines = [
        f"# The memory layer alone, to large memories{' (quick smoke run)' if settings['quick'] else ''}",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['date']}; {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"product-key-memory {meta['product_key_memory'] or 'not installed'}.",
        "",
        f"{settings['batch']} x {settings['length']} tokens at H={settings['hidden']}, top-k {settings['top_k']}, "
        f"{settings['threads']} threads, fp32. Each job (one slot count; "
        "flat, product-key or training variants) runs in a fresh process and times its variants, their "
        f"arithmetic floors and one BERT layer in interleaved rounds ({settings['rounds']} rounds, "
        f"{settings['heavy_rounds']} above {HEAVY_SLOTS:,} slots, "
        "after one warm-up round); times are medians, ratios the median over rounds of the ratio in each round "
        "(95% bootstrap interval in brackets). The BERT layer runs in eval mode for the forward rows and in "
        "train mode (dropout) for fwd+bwd and training steps. Peak = the resident memory a call adds (the "
        "parameters are already resident; the gradients are created by the call). Gradient written = the bytes "
        "of the parameters' `.grad` after one fwd+bwd (a sparse gradient: its values and indices). Floor = one "
        "plain `torch.mm` `[tokens, H] @ [H, M]` with the read's multiply-adds per token (M = those / H), into a "
        "preallocated output. product-key-memory: `PKM(dim, num_keys=sqrt(slots))` with its defaults "
        f"({PKM['heads']} heads, top-{PKM['topk']}, dim_head {PKM['dim_head']}: 128 values per token, as many as "
        "spartan's top-8 x 16 children), dense gradients.",
        "",
    ]
    lines += [f"- {note}" for note in results["notes"]] + ([""] if results["notes"] else [])

    def status_row(row: dict, columns: int) -> str:
        return (f"| {row['slots']:,} | {row['label']} | {row['shape']} | {row['status']}: {row['note']} "
                + "| " * (columns - 4) + "|")

    read_rows = [r for r in rows if not r["variant"].startswith("step_")]
    lines += ["## Forward", "",
              "| slots | variant | shape | ms | us / token | % of BERT layer | x its floor | x its traffic floor "
              "| x pkm | peak MiB |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in read_rows:
        if row["status"] != "measured":
            lines.append(status_row(row, 10))
            continue
        f = row["forward"]
        low, high = f["vs_bert_layer_ci95"]
        pkm_ratio = f"{f['vs_pkm']:.2f}" if "vs_pkm" in f else ""
        traffic_ratio = f"{f['vs_traffic_floor']:.2f}" if "vs_traffic_floor" in f else ""
        lines.append(f"| {row['slots']:,} | {row['label']} | {row['shape']} | {f['ms']:.2f} | {f['us_per_token']:.2f} "
                     f"| {100 * f['vs_bert_layer']:.1f}% ({100 * low:.1f}..{100 * high:.1f}) | {f['vs_floor']:.2f} "
                     f"| {traffic_ratio} | {pkm_ratio} | {f['peak_mib']:.1f} |")
    lines += ["", "## Forward + backward", "",
              "| slots | variant | shape | ms | us / token | % of BERT layer fwd+bwd | x own forward | x pkm "
              "| gradient written MiB | peak MiB | peak beyond gradients MiB |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in read_rows:
        if row["status"] != "measured":
            lines.append(status_row(row, 11))
            continue
        b = row["forward_backward"]
        low, high = b["vs_bert_layer_ci95"]
        pkm_ratio = f"{b['vs_pkm']:.2f}" if "vs_pkm" in b else ""
        lines.append(f"| {row['slots']:,} | {row['label']} | {row['shape']} | {b['ms']:.2f} | {b['us_per_token']:.2f} "
                     f"| {100 * b['vs_bert_layer']:.1f}% ({100 * low:.1f}..{100 * high:.1f}) "
                     f"| {b['vs_own_forward']:.2f} | {pkm_ratio} | {mib(b['gradient_bytes'])} | {b['peak_mib']:.1f} "
                     f"| {b['peak_beyond_gradients_mib']:.1f} |")
    step_rows = [r for r in rows if r["variant"].startswith("step_")]
    if step_rows:
        lines += ["", "## One training step (forward, backward, optimizer step)", "",
                  f"Learning rate {LEARNING_RATE:g}, weight decay {WEIGHT_DECAY:g}; the optimizer's moments are "
                  "allocated in the warm-up round, so the peak is a steady-state step's.", "",
                  "| slots | variant | shape | ms | % of BERT layer fwd+bwd | gradient written MiB "
                  "| optimizer state MiB | peak MiB |",
                  "|---:|---|---|---:|---:|---:|---:|---:|"]
        for row in step_rows:
            if row["status"] != "measured":
                lines.append(status_row(row, 8))
                continue
            s = row["step"]
            low, high = s["vs_bert_layer_forward_backward_ci95"]
            lines.append(f"| {row['slots']:,} | {row['label']} | {row['shape']} | {s['ms']:.2f} "
                         f"| {100 * s['vs_bert_layer_forward_backward']:.1f}% ({100 * low:.1f}..{100 * high:.1f}) "
                         f"| {mib(s['gradient_bytes'])} | {mib(s['optimizer_state_bytes'])} | {s['peak_mib']:.1f} |")
    lines += ["", "## Arithmetic floors", "",
              f"One `torch.mm` of `[{tokens}, {settings['hidden']}] @ [{settings['hidden']}, M]`, timed in the same "
              "rounds as the forward rows.", "",
              "| slots | variant | shape | multiply-adds per token | M | ms | GFLOP/s | % of BERT layer |",
              "|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in read_rows:
        if row["status"] == "measured":
            fl = row["floor"]
            lines.append(f"| {row['slots']:,} | {row['label']} | {row['shape']} | {fl['macs_per_token']:,} "
                         f"| {fl['mm'][2]:,} | {fl['ms']:.2f} | {fl['gflops']:.1f} "
                         f"| {100 * fl['vs_bert_layer']:.1f}% |")
    traffic_rows = [r for r in read_rows if r["status"] == "measured" and "traffic_floor" in r]
    if traffic_rows:
        lines += ["", "## Memory-traffic floors", "",
                  "Each distinct child row a sparse read touches (its tokens' top-k parents x C children, keys and "
                  f"values), once, in ascending order, gathered by `index_select` into one reused buffer of "
                  f"{TRAFFIC_CHUNK_ROWS:,} rows and timed in the same rounds: what moving these rows costs, about the "
                  "least traffic any read of them needs, with none of its arithmetic. Rows touched counts them with "
                  "their repeats (one per token that selected the row's parent).", "",
                  "| slots | variant | shape | rows touched | distinct rows | distinct MiB | ms | GB/s | "
                  "% of BERT layer |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in traffic_rows:
            t = row["traffic_floor"]
            lines.append(f"| {row['slots']:,} | {row['label']} | {row['shape']} | {t['rows']:,} "
                         f"| {t['distinct_rows']:,} | {mib(t['distinct_bytes'])} | {t['ms']:.2f} "
                         f"| {t['distinct_gb_per_s']:.1f} "
                         f"| {100 * t['vs_bert_layer']:.1f}% |")
    berts = {r["job"]: r["bert_layer"] for r in rows if r["status"] == "measured"}
    if berts:
        forward = [b["forward_ms"] for b in berts.values() if "forward_ms" in b]
        backward = [b["forward_backward_ms"] for b in berts.values() if "forward_backward_ms" in b]
        span = (lambda v: f"{min(v):.1f}-{max(v):.1f} ms" if v else "not timed")
        lines += ["", f"One BERT layer across the jobs: forward {span(forward)}, fwd+bwd {span(backward)}."]
    lines += ["", "## Targets", ""] + [f"- {t['line']}" for t in results["targets"]]
    return "\n".join(lines) + "\n"


def positive(text: str) -> int:
    return check.positive_int("value", int(text))


def only_choices(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CHOICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}: choose from {', '.join(CHOICES)}")
    return names


def slot_list(text: str) -> list[int]:
    return [positive(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [WORKER_FLAG]:
        worker_main(Path(argv[1]), Path(argv[2]))
        return 0
    ram = machine_ram_bytes()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-slots", type=positive, default=SLOT_COUNTS[-1], help="largest slot count measured")
    parser.add_argument("--slots", type=slot_list, help="comma-separated slot counts of the sweep to run (default: "
                        "all up to --max-slots)")
    parser.add_argument("--only", type=only_choices, default=list(CHOICES),
                        help=f"comma-separated subset of {','.join(CHOICES)} (default: all)")
    parser.add_argument("--rounds", type=positive, help=f"timed rounds per job up to {HEAVY_SLOTS:,} slots (default 9)")
    parser.add_argument("--heavy-rounds", type=positive, help=f"timed rounds above {HEAVY_SLOTS:,} slots (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: H=64, 2 x 16 tokens, small memories, 2 rounds")
    parser.add_argument("--top-k", type=positive, default=8)
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--dense-limit-gib", type=float, default=4.0, help="skip dense reads needing more activations")
    parser.add_argument("--memory-gib", type=float, default=((ram or 24 * 2**30) - HEADROOM_BYTES) / 2**30,
                        help="memory a job may take, estimated from the shapes (default: RAM less 2 GiB)")
    parser.add_argument("--output", type=Path, default=RESULTS / "memory_layer_large",
                        help="writes OUTPUT.json and OUTPUT.md (default results/memory_layer_large)")
    args = parser.parse_args(argv)
    if args.memory_gib <= 0 or args.dense_limit_gib <= 0:
        parser.error("--memory-gib and --dense-limit-gib must be positive")
    quick = QUICK if args.quick else {}
    slots = quick.get("slots", SLOT_COUNTS)
    if args.slots:
        if set(args.slots) - set(slots):
            parser.error(f"--slots {','.join(map(str, sorted(set(args.slots) - set(slots))))} is not in the sweep: "
                         f"choose from {','.join(map(str, slots))}")
        slots = sorted(set(args.slots))
    if args.max_slots < min(slots):
        parser.error(f"--max-slots {args.max_slots} is below the smallest memory ({min(slots)} slots)")
    settings = {
        "quick": args.quick, "hidden": quick.get("hidden", 768),
        "batch": quick.get("batch", 32), "length": quick.get("length", 128), "top_k": args.top_k,
        "threads": args.threads, "slots": list(slots),
        "pkm_slots": list(quick.get("pkm_slots", PKM_SLOTS)),
        "train_slots": list(quick.get("train_slots", TRAIN_SLOTS)),
        "rounds": args.rounds or quick.get("rounds", 9),
        "heavy_rounds": args.heavy_rounds or quick.get("heavy_rounds", 3),
    }
    if args.top_k > 16:
        parser.error(f"--top-k {args.top_k} exceeds the paper-size memory's 16 parents: use at most 16")
    pkm_version = package_version("product-key-memory")
    pkm_available = pkm_version is not None and importlib.util.find_spec("product_key_memory") is not None
    jobs, decided = plan(args, settings, pkm_available)
    if not jobs and not decided:
        parser.error(f"nothing to run: --only {','.join(args.only)} has no row up to --max-slots {args.max_slots}")
    notes = []
    if not pkm_available and "pkm" in args.only:
        notes.append("product-key-memory is not installed in this environment: its rows are skipped "
                     "(benchmarks/README.md: Large memories says how to install it in .venv-bench).")
    results = {"meta": meta(pkm_version, argv), "settings": settings, "notes": notes}

    def report(rows: list[dict]) -> str:  # after every worker: an interrupted sweep keeps what it measured
        results["rows"], results["targets"] = rows, targets(rows, settings)
        table = markdown(results)
        atomic_write_text(args.output.with_suffix(".md"), table)
        atomic_write_text(args.output.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
        return table

    rows = run_workers(workers_for(jobs), settings, list(decided), report)
    print(report(rows))
    for target in results["targets"]:
        print(f"target: {target['line']}")
    return 0


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def meta(pkm_version: str | None, argv: list[str]) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    ram = machine_ram_bytes()
    machine = f"{cpu}, {os.cpu_count()} logical CPUs" + (f", {ram / 2**30:.1f} GiB RAM" if ram else "")
    return {
        "command": "python " + shlex.join(["benchmarks/memory_layer.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{machine}, {platform.platform()}", "python": platform.python_version(),
        "torch": torch.__version__, "transformers": package_version("transformers"),
        "product_key_memory": pkm_version,
    }


if __name__ == "__main__":
    sys.exit(main())
