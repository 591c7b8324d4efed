"""The Accelerate training loop: learning, reproducibility, resume, best checkpoint, early stopping, config checks,
gradient accumulation, logs, errors, two processes, data-parallel and sharded; and the transformers Trainer on a
wrapped model."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.tiny_models import tiny, tiny_bert_without_dropout
from tests.toy_data import CrashingDataset, Interrupted, accuracy, toy_dataset

import spartan
from spartan.training import TrainingConfig, padding_collator, train

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train fastest on one thread, and many times faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wrapped_bert(**overrides):
    return spartan.wrap_model(tiny("bert"), num_parents=8, top_k=4, **overrides)


def settings(tmp_path, name="run", **overrides):
    values = {"learning_rate": 5e-2, "num_epochs": 2, "batch_size": 16, "log_every_steps": 2, "progress": False}
    values |= overrides
    return TrainingConfig(output_dir=str(tmp_path / name), **values)


def trainable(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_tensors(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


def evaluations(result):
    return [{k: v for k, v in record.items() if k != "time"} for record in result.log_history if "eval_loss" in record]


def test_learns_toy_task_and_logs(tmp_path):
    model = wrapped_bert()
    config = settings(tmp_path, num_epochs=5, batch_size=32, log_every_steps=4, metric_for_best="accuracy")
    eval_data = toy_dataset(128, seed=1)
    result = train(model, toy_dataset(256), eval_data, config, compute_metrics=accuracy)

    scores = [record["accuracy"] for record in evaluations(result)]
    losses = [record["loss"] for record in result.log_history if "loss" in record]
    assert [record["step"] for record in evaluations(result)] == [8, 16, 24, 32, 40]  # each epoch's end
    assert max(scores) >= 0.7 and max(scores) > scores[0] + 0.1
    assert losses[-1] < losses[0]
    assert result.best_metrics["accuracy"] == max(scores) and result.global_step == 40
    assert result.train_samples == 5 * 256
    assert 0 < result.checkpoint_runtime_s < result.train_runtime_s  # evaluation and saving, timed apart

    lines = result.log_file.read_text().splitlines()
    assert [json.loads(line) for line in lines] == result.log_history
    assert all({"step", "epoch", "time"} <= record.keys() for record in result.log_history)
    assert {"loss", "lr"} <= result.log_history[0].keys()

    # The model holds the best checkpoint, which spartan.load_memory reads.
    assert not model.training
    with torch.no_grad():
        logits = model(**padding_collator(eval_data)).logits
    labels = np.array([example["labels"] for example in eval_data])
    assert accuracy(logits.numpy(), labels)["accuracy"] == pytest.approx(result.best_metrics["accuracy"])
    loaded = spartan.load_memory(tiny("bert"), result.best_checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**padding_collator(eval_data[:8])).logits, logits[:8])

    # Only the trainable parameters were optimised, and the resume state holds no pickle.
    state = json.loads((result.last_checkpoint / "training_state.json").read_text())
    assert state["parameter_names"] == list(trainable(model))
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(trainable(model))
    assert sorted(path.name for path in result.last_checkpoint.iterdir()) == [
        "trainable_weights.safetensors",
        "training_state.json",
        "training_state.safetensors",
    ]


def test_same_seed_gives_identical_runs(tmp_path):
    results, weights = [], []
    for name, sharding in [("first", "none"), ("second", "fsdp")]:  # on one process, nothing to shard across
        model = wrapped_bert()
        options = {"max_steps": 6, "eval_every_steps": 3, "metric_for_best": "accuracy", "sharding": sharding}
        config = settings(tmp_path, name, **options)
        results.append(train(model, toy_dataset(64), toy_dataset(32, seed=1), config, compute_metrics=accuracy))
        weights.append(trainable(model))
    assert evaluations(results[0]) == evaluations(results[1])
    assert_same_tensors(weights[1], weights[0])


def test_train_seeds_what_it_draws(tmp_path):
    """train() seeds Python, NumPy and torch before it makes anything: the dropout masks and the data
    order repeat whatever the global generators held before the call; another seed gives another run."""
    logs, weights = [], []
    for index, (name, seed) in enumerate([("first", 42), ("second", 42), ("other_seed", 7)]):
        model = wrapped_bert()  # built identically (tiny() seeds torch), then the global generators differ
        torch.manual_seed(100 + index)
        np.random.seed(100 + index)
        random.seed(100 + index)
        config = settings(tmp_path, name, seed=seed, max_steps=4, eval_every_steps=2)
        result = train(model, toy_dataset(64), toy_dataset(32, seed=1), config, compute_metrics=accuracy)
        logs.append([{k: v for k, v in record.items() if k != "time"} for record in result.log_history])
        weights.append(trainable(model))
    assert logs[0] == logs[1] and len(logs[0]) == 4  # losses at steps 2 and 4, evaluations at steps 2 and 4
    assert_same_tensors(weights[1], weights[0])
    assert logs[2] != logs[0]
    assert any(not torch.equal(weights[2][name], value) for name, value in weights[0].items())


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    # 96 examples in batches of 8, 2 batches per update: 6 updates per epoch, 12 in all; state saved
    # at updates 4, 6 (epoch end), 8 and 12. The crash comes in epoch 2, after update 8's save.
    train_data, eval_data = toy_dataset(96), toy_dataset(32, seed=1)
    options = {"batch_size": 8, "gradient_accumulation_steps": 2, "eval_every_steps": 4, "metric_for_best": "accuracy"}

    reference_model = wrapped_bert()
    reference = train(reference_model, train_data, eval_data, settings(tmp_path, "reference", **options), accuracy)

    config = settings(tmp_path, "interrupted", **options)
    with pytest.raises(Interrupted):
        train(wrapped_bert(), CrashingDataset(train_data, crash_after=96 + 7 * 8), eval_data, config, accuracy)
    saved = json.loads((Path(config.output_dir) / "last" / "training_state.json").read_text())["progress"]
    assert (saved["global_step"], saved["epoch"], saved["batches_done"]) == (8, 1, 4)

    resumed_model = wrapped_bert()
    resumed = train(resumed_model, train_data, eval_data, config, accuracy)
    assert resumed.global_step == reference.global_step == 12
    without_time = [
        [{k: v for k, v in r.items() if k != "time"} for r in run.log_history] for run in (resumed, reference)
    ]
    assert without_time[0] == without_time[1]  # losses, learning rates and metrics
    assert_same_tensors(
        load_file(resumed.last_checkpoint / "trainable_weights.safetensors"),
        load_file(reference.last_checkpoint / "trainable_weights.safetensors"),
    )
    assert_same_tensors(trainable(resumed_model), trainable(reference_model))

    # A finished run resumes to its end at once, with the same best weights; also when a crash
    # between the two renames of a save left only the previous state.
    os.replace(resumed.last_checkpoint, resumed.last_checkpoint.with_name(".last.previous"))
    again_model = wrapped_bert()
    again = train(again_model, train_data, eval_data, config, accuracy)
    assert (again.global_step, again.best_metrics, again.log_history) == (12, resumed.best_metrics, resumed.log_history)
    assert_same_tensors(trainable(again_model), trainable(reference_model))


@pytest.mark.parametrize("wrapped", [True, False], ids=["spartan", "head-only"])
def test_keeps_best_checkpoint_and_stops_early(tmp_path, wrapped):
    if wrapped:
        model = wrapped_bert()
    else:  # a head-only baseline: an ordinary model with a frozen backbone
        model = tiny("bert")
        model.bert.requires_grad_(False)
    scores = iter([0.5, 0.8, 0.6, 0.7, 0.9])
    weights_at_step = {}

    def scripted_metrics(predictions, references):
        weights_at_step[len(weights_at_step) * 2 + 2] = trainable(model)
        return {"accuracy": next(scores)}

    config = settings(tmp_path, max_steps=20, eval_every_steps=2, metric_for_best="accuracy", early_stopping_patience=2)
    result = train(model, toy_dataset(64), toy_dataset(16, seed=1), config, scripted_metrics)

    assert result.stopped_early and result.global_step == 8  # 0.6 and 0.7 do not beat 0.8
    assert (result.best_step, result.best_metrics["accuracy"]) == (4, 0.8)
    assert_same_tensors(trainable(model), weights_at_step[4])
    assert any(not torch.equal(weights_at_step[8][name], value) for name, value in weights_at_step[4].items())
    best_files = sorted(path.name for path in result.best_checkpoint.iterdir())
    expected = ["spartan_config.json", "spartan_memory.safetensors"] if wrapped else ["trainable_weights.safetensors"]
    assert best_files == sorted(["best_metrics.json", *expected])
    assert json.loads((result.best_checkpoint / "best_metrics.json").read_text())["step"] == 4


def test_lowest_eval_loss_is_best_by_default(tmp_path):
    result = train(wrapped_bert(), toy_dataset(64), toy_dataset(16, seed=1), settings(tmp_path, eval_every_steps=2))
    losses = [record["eval_loss"] for record in evaluations(result)]
    assert result.best_metrics == {"eval_loss": min(losses)}
    assert result.best_step == evaluations(result)[losses.index(min(losses))]["step"]


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    # Without dropout and the load-balancing loss (a statistic of each forward's batch, so only
    # approximately the same over 4 batches of 8 as over one of 32), the updates are the same.
    def final_weights(name, batch_size, accumulation):
        model = spartan.wrap_model(tiny_bert_without_dropout(), num_parents=8, top_k=4, aux_loss_weight=0.0)
        config = settings(tmp_path, name, max_steps=4, batch_size=batch_size, gradient_accumulation_steps=accumulation)
        train(model, toy_dataset(128), config=config)
        return trainable(model)

    large_batch = final_weights("large", 32, 1)
    accumulated = final_weights("accumulated", 8, 4)
    small_batch = final_weights("small", 8, 1)
    for name, expected in large_batch.items():
        torch.testing.assert_close(accumulated[name], expected, rtol=0, atol=2e-4, msg=name)
    assert all(not torch.allclose(small_batch[name], expected, atol=1e-2) for name, expected in large_batch.items())


def test_trains_on_hugging_face_datasets(tmp_path):
    from datasets import Dataset

    rows = [example | {"idx": index} for index, example in enumerate(toy_dataset(32))]
    as_lists = Dataset.from_list(rows)
    as_tensors = Dataset.from_list(rows).with_format("torch")
    result = train(wrapped_bert(), as_lists, as_tensors, settings(tmp_path, max_steps=2), compute_metrics=accuracy)
    assert result.global_step == 2 and "accuracy" in result.best_metrics


def test_padding_collator():
    batch = padding_collator([{"input_ids": [5, 6, 7], "label": 1, "idx": 0}, {"input_ids": [8], "label": 0, "idx": 1}])
    assert batch.keys() == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="input_ids"):
        padding_collator([{"text": "no tokens"}])


def test_parameter_learning_rates(tmp_path):
    model = wrapped_bert()
    before = trainable(model)
    config = settings(tmp_path, max_steps=4, parameter_learning_rates={"*LayerNorm*": 1e-12, "*memories*.values": 1e-1})
    train(model, toy_dataset(64), config=config)
    change = {name: (p - before[name]).abs().max().item() for name, p in trainable(model).items()}
    norms = [name for name in change if "LayerNorm" in name]
    assert norms and max(change[name] for name in norms) < 1e-10
    # Adam moves each parameter by about its learning rate per update: 0.1 for the memory values, 0.05 elsewhere
    values = [change[name] for name in change if name.startswith("spartan_memories.") and name.endswith(".values")]
    keys = [change[name] for name in change if name.startswith("spartan_memories.") and name.endswith(".keys")]
    assert values and keys and min(values) > max(keys) * 1.5
    with pytest.raises(ValueError, match=r"\['\*adapter\*'\] match no trainable parameter"):
        train(model, toy_dataset(16), config=settings(tmp_path, "bad", parameter_learning_rates={"*adapter*": 1e-3}))


def test_config_json_round_trip(tmp_path):
    config = TrainingConfig(tmp_path / "run", max_steps=5, metric_for_best="f1", early_stopping_patience=3)
    config.save(tmp_path / "config.json")
    assert TrainingConfig.load(tmp_path / "config.json") == config
    assert config.output_dir == str(tmp_path / "run")
    with pytest.raises(ValueError, match="unknown TrainingConfig field"):
        TrainingConfig.from_dict({"output_dir": "x", "epochs": 3})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"learning_rate": 0}, "learning_rate"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"max_steps": 0}, "max_steps"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"mixed_precision": "fp16"}, "mixed_precision"),
        ({"early_stopping_patience": 0}, "early_stopping_patience"),
        ({"seed": -1}, "seed"),
        ({"output_dir": ""}, "output_dir"),
        ({"parameter_learning_rates": {"*LayerNorm*": 0}}, "parameter_learning_rates"),
        ({"parameter_learning_rates": [1]}, r"parameter_learning_rates must be a dict \{pattern: rate\}"),
        ({"parameter_learning_rates": {"": 1e-3}}, "parameter_learning_rates keys"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"learning_rate": True}, "learning_rate must be a finite number"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
        ({"learning_rate": "fast"}, "learning_rate must be a finite number"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm"),
        ({"weight_decay": float("-inf")}, "weight_decay"),
        ({"seed": 2**32}, "seed"),
        ({"num_workers": -1}, "num_workers"),
        ({"eval_every_steps": 1.5}, "eval_every_steps"),
        ({"resume": "no"}, "resume must be True or False"),
        ({"greater_is_better": "no"}, "greater_is_better must be True or False"),
        ({"progress": "no"}, "progress must be True or False"),
        ({"metric_for_best": ""}, "metric_for_best"),
        ({"output_dir": None}, "output_dir"),
        ({"sharding": "zero3"}, "sharding must be one of 'none', 'fsdp'"),
    ],
)
def test_bad_config_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        TrainingConfig(**({"output_dir": "runs/x"} | overrides))
    assert "\n" not in str(error.value)  # one line, naming the field


def test_config_values_are_normalised(tmp_path):
    """Numbers as YAML strings or NumPy scalars become Python ints and floats, and round-trip through JSON."""
    config = TrainingConfig(
        output_dir=tmp_path / "run",
        learning_rate="3e-3",
        parameter_learning_rates={"*LayerNorm*": "1e-4"},
        batch_size=np.int64(8),
        max_steps=np.int32(5),
        seed=np.uint32(7),
        warmup_ratio=0,
        max_grad_norm=np.float32(0.5),
        greater_is_better=False,
    )
    assert (config.learning_rate, config.parameter_learning_rates) == (0.003, {"*LayerNorm*": 1e-4})
    assert (config.batch_size, config.max_steps, config.seed, config.warmup_ratio) == (8, 5, 7, 0.0)
    assert config.greater_is_better is False and config.max_grad_norm == 0.5
    for name in ("batch_size", "max_steps", "seed"):
        assert type(getattr(config, name)) is int, name
    for name in ("learning_rate", "warmup_ratio", "max_grad_norm"):
        assert type(getattr(config, name)) is float, name
    assert config.output_dir == str(tmp_path / "run")
    config.save(tmp_path / "config.json")
    assert TrainingConfig.load(tmp_path / "config.json") == config


def test_clear_errors(tmp_path):
    model, data = wrapped_bert(), toy_dataset(16)
    with pytest.raises(ValueError, match="train_dataset is empty"):
        train(model, [], config=settings(tmp_path))
    with pytest.raises(ValueError, match="eval_dataset is empty"):
        train(model, data, [], settings(tmp_path))
    with pytest.raises(ValueError, match="needs a compute_metrics"):
        train(model, data, data, settings(tmp_path, metric_for_best="accuracy"))
    with pytest.raises(ValueError, match="need an eval_dataset"):
        train(model, data, config=settings(tmp_path, early_stopping_patience=2))
    with pytest.raises(ValueError, match="TrainingConfig"):
        train(model, data)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(tiny("bert").requires_grad_(False), data, config=settings(tmp_path))
    with pytest.raises(ValueError, match="'f1' is not among the evaluation metrics"):
        train(model, data, data, settings(tmp_path, max_steps=1, metric_for_best="f1"), compute_metrics=accuracy)
    train(model, data, config=settings(tmp_path, "finished", max_steps=1))
    with pytest.raises(ValueError, match="cannot resume .* batch_size: 16 then, 8 now"):
        train(model, data, config=settings(tmp_path, "finished", max_steps=1, batch_size=8))
    # the same parameters under other memory settings are another run
    with pytest.raises(ValueError, match="cannot resume .*memory.top_k: 4 then, 2 now"):
        train(spartan.wrap_model(tiny("bert"), num_parents=8, top_k=2), data, config=settings(tmp_path, "finished", max_steps=1))


def run_on_two_cpu_processes(script, output):
    """Run ``tests/<script> <output>`` on two CPU processes (gloo) started by torchrun."""
    environment = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(TESTS / script), str(output)]
    completed = subprocess.run(command, check=False, env=environment, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]


def test_two_processes(tmp_path):
    """Data-parallel on CPU: each process takes half the batches; evaluation gathers all examples."""
    run_on_two_cpu_processes("distributed_training_run.py", tmp_path / "run")

    results = [json.loads((tmp_path / "run" / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1]
    assert results[0]["global_step"] == 8  # 64 examples / (8 per batch * 2 processes) * 2 epochs
    assert results[0]["train_samples"] == 128
    assert results[0]["best_metrics"]["examples"] == 45  # gathered, without the padding duplicates
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 8]  # written by one process only: evaluations at each epoch's end, the loss at the end


def test_sharded_training_on_two_processes(tmp_path):
    """sharding="fsdp" on two CPU processes (tests/sharded_training_run.py): each process holds one slice of
    every memory table; the run reaches the parameters of the data-parallel one, with gradient accumulation
    and clipping by the global norm; its checkpoints hold full tensors in the unsharded run's format; an
    interrupted sharded run resumes exactly; every process's model comes back whole, holding best/."""
    run_on_two_cpu_processes("sharded_training_run.py", tmp_path)

    def outputs(name):
        summaries = [json.loads((tmp_path / f"{name}-{rank}.json").read_text()) for rank in (0, 1)]
        tensors = [load_file(tmp_path / f"{name}-{rank}.safetensors") for rank in (0, 1)]
        assert_same_tensors(tensors[1], tensors[0])  # the same model on both processes
        assert all(summary["plain_after_training"] for summary in summaries)
        return summaries, tensors[0]

    (ddp, _), (fsdp, fsdp_model), (resumed, resumed_model) = outputs("ddp"), outputs("fsdp"), outputs("resumed")
    whole = [["keys", [27, 32], 27], ["sub_keys", [2, 3, 16], 2], ["values", [27, 32], 27]]
    assert ddp[0]["table_rows"] == ddp[1]["table_rows"] == whole
    assert fsdp[0]["table_rows"] == [["keys", [27, 32], 14], ["sub_keys", [2, 3, 16], 1], ["values", [27, 32], 14]]
    assert fsdp[1]["table_rows"] == [["keys", [27, 32], 13], ["sub_keys", [2, 3, 16], 1], ["values", [27, 32], 13]]
    assert fsdp[0]["global_step"] == 6 and fsdp[0]["log"] == fsdp[1]["log"]

    # The final parameters, gathered into last/, are the data-parallel run's; the files have the same format.
    last = {name: tmp_path / name / "last" for name in ("ddp", "fsdp", "resumed")}
    final = {name: load_file(folder / "trainable_weights.safetensors") for name, folder in last.items()}
    assert final["fsdp"].keys() == final["ddp"].keys()
    for name, expected in final["ddp"].items():
        torch.testing.assert_close(final["fsdp"][name], expected, rtol=0, atol=1e-5, msg=name)
    states = {name: load_file(folder / "training_state.safetensors") for name, folder in last.items()}
    assert {k: v.shape for k, v in states["fsdp"].items()} == {k: v.shape for k, v in states["ddp"].items()}
    descriptions = {name: json.loads((folder / "training_state.json").read_text()) for name, folder in last.items()}
    assert descriptions["fsdp"]["optimizer"]["param_groups"] == descriptions["ddp"]["optimizer"]["param_groups"]
    assert descriptions["fsdp"].keys() == descriptions["ddp"].keys()
    for kind in ("last", "best"):
        files = [sorted(path.name for path in (tmp_path / name / kind).iterdir()) for name in ("fsdp", "ddp")]
        assert files[0] == files[1]

    # Interrupted mid-epoch and resumed: the uninterrupted sharded run's log, parameters and optimizer state.
    assert resumed[0]["log"] == fsdp[0]["log"]
    assert_same_tensors(final["resumed"], final["fsdp"])
    assert_same_tensors(states["resumed"], states["fsdp"])
    assert_same_tensors(resumed_model, fsdp_model)

    # best/ loads with spartan.load_memory into a fresh, unsharded model: the trained model's outputs.
    loaded = spartan.load_memory(tiny("bert"), tmp_path / "fsdp" / "best")
    with torch.no_grad():
        logits = loaded(**padding_collator(toy_dataset(24, seed=1)[:8])).logits
    torch.testing.assert_close(logits, fsdp_model["logits"], rtol=0, atol=1e-6)
    best_weights = {f"trained.{name}": value for name, value in trainable(loaded).items()}
    assert_same_tensors(best_weights, {name: value for name, value in fsdp_model.items() if name != "logits"})


def test_sharding_refusals(tmp_path):
    """What sharding="fsdp" cannot shard is refused on one process already, in one line naming the fix."""
    sparse = spartan.wrap_model(
        tiny("bert"), num_parents=16, top_k=2, parent_keys="product", implementation="sparse", sparse_gradients=True
    )
    with pytest.raises(ValueError, match=r"cannot reduce-scatter sparse gradients: .*sparse_gradients=False\)"):
        train(sparse, toy_dataset(16), config=settings(tmp_path, sharding="fsdp"))
    tied = tiny("bert").requires_grad_(False)
    norms = [layer.output.LayerNorm for layer in tied.bert.encoder.layer]
    norms[1].weight = norms[0].weight.requires_grad_(True)  # one trainable tensor in two modules
    with pytest.raises(ValueError, match=r"layer.0.output.LayerNorm' and .*layer.1.output.LayerNorm' share a param"):
        train(tied, toy_dataset(16), config=settings(tmp_path, sharding="fsdp"))


def test_transformers_trainer_trains_a_wrapped_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = wrapped_bert()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=toy_dataset(24), data_collator=padding_collator)
    trainer.train()

    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    memories = {name for name in before if name.startswith("spartan_memories.")}
    norms = {name for name in before if name.startswith("bert.encoder.layer.") and ".LayerNorm." in name}
    backbone = {name for name in before if name.startswith("bert.")} - norms
    assert changed & memories and changed & norms and "classifier.weight" in changed
    assert not changed & backbone

    # The loss Trainer optimises is the task loss plus the load-balancing loss.
    model.train()
    inputs = padding_collator(toy_dataset(8))
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
        task_loss = torch.nn.functional.cross_entropy(outputs.logits, inputs["labels"])
        torch.testing.assert_close(loss, task_loss + spartan.auxiliary_loss(model))
    assert spartan.auxiliary_loss(model) > 0
