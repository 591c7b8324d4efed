"""Memory-only checkpoints and many tasks on one backbone."""

import json

import pytest
import torch
from tiny_models import batch, tiny

from transformers import BertConfig, BertForSequenceClassification

import spartan
from spartan.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def train_a_few_steps(model, inputs, steps=3, lr=5e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()
    return model.eval()


def trained_task(tmp_path, name, seed, **overrides):
    model = spartan.wrap_model(tiny("bert"), num_parents=8, top_k=3, name=name, **overrides)
    inputs = batch(seed=seed)
    torch.manual_seed(seed)
    train_a_few_steps(model, inputs)
    folder = spartan.save_memory(model, tmp_path / name)
    return model(**inputs).logits.detach(), inputs, folder


def test_save_writes_only_task_weights(tmp_path):
    model = spartan.wrap_model(tiny("bert"))
    spartan.save_memory(model, tmp_path / "task")
    assert sorted(p.name for p in (tmp_path / "task").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    description, tensors = spartan.read_checkpoint(tmp_path / "task")
    norms = tuple(
        f"head.bert.encoder.layer.{i}.{n}.LayerNorm." for i in range(2) for n in ("attention.output", "output")
    )
    assert all(key.startswith(("memories.", "head.classifier.", *norms)) for key in tensors)
    assert any(key.startswith(norms) for key in tensors)  # the trained LayerNorms travel with the task
    assert sum(t.numel() for t in tensors.values()) == spartan.trainable_parameters(model)["trainable_params"]
    assert description["backbone"]["hidden_size"] == 32 and description["config"]["num_parents"] == 16


def test_round_trip_reproduces_logits(tmp_path):
    logits, inputs, folder = trained_task(tmp_path, "sst2", seed=1)
    fresh = tiny("bert")
    assert spartan.load_memory(fresh, folder) is fresh
    assert spartan.active_memory_name(fresh) == "sst2"
    assert torch.equal(fresh(**inputs).logits, logits)


@pytest.mark.parametrize("train_layer_norms", [False, True])
def test_two_tasks_on_one_backbone(tmp_path, train_layer_norms):
    logits_a, inputs_a, folder_a = trained_task(tmp_path, "task_a", seed=1, train_layer_norms=train_layer_norms)
    logits_b, inputs_b, folder_b = trained_task(tmp_path, "task_b", seed=2, train_layer_norms=train_layer_norms)
    backbone = tiny("bert")
    original_norm = backbone.bert.encoder.layer[0].output.LayerNorm.weight.detach().clone()
    spartan.load_memory(backbone, folder_a)
    spartan.load_memory(backbone, folder_b)
    assert spartan.memory_names(backbone) == ["task_a", "task_b"]
    assert torch.equal(backbone(**inputs_b).logits, logits_b)
    spartan.set_active_memory(backbone, "task_a")
    assert torch.equal(backbone(**inputs_a).logits, logits_a)
    spartan.set_active_memory(backbone, "task_b")
    assert torch.equal(backbone(**inputs_b).logits, logits_b)
    # only the active task trains
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert any(n.startswith("spartan_memories.task_b.") for n in trainable)
    assert not any(n.startswith("spartan_memories.task_a.") for n in trainable)
    with pytest.raises(ValueError, match="already has a memory named 'task_b'"):
        spartan.load_memory(backbone, folder_b)
    spartan.load_memory(backbone, folder_b, name="task_b_copy")
    assert torch.equal(backbone(**inputs_b).logits, logits_b)
    norm_trained = not torch.equal(backbone.bert.encoder.layer[0].output.LayerNorm.weight, original_norm)
    assert norm_trained == train_layer_norms  # each task brings its own norms
    spartan.unwrap_model(backbone)
    assert torch.equal(backbone.bert.encoder.layer[0].output.LayerNorm.weight, original_norm)


def test_add_memory_starts_from_original_head(tmp_path):
    model = spartan.wrap_model(tiny("bert"))
    original = model.classifier.weight.detach().clone()
    train_a_few_steps(model, batch())
    spartan.add_memory(model, "other", top_k=4)
    spartan.set_active_memory(model, "other")
    assert torch.equal(model.classifier.weight, original)
    assert spartan.get_config(model).top_k == 4
    with pytest.raises(ValueError, match="active memory"):
        spartan.remove_memory(model, "other")
    spartan.remove_memory(model, "default")
    assert spartan.memory_names(model) == ["other"]


def test_mismatched_backbone_is_refused(tmp_path):
    _, _, folder = trained_task(tmp_path, "task", seed=1)
    other = BertForSequenceClassification(
        BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=99)
    )
    with pytest.raises(ValueError, match="hidden size 32 and 2 layers"):
        spartan.load_memory(other, folder)
    assert not spartan.is_wrapped(other)
    three_labels = BertForSequenceClassification(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            vocab_size=99,
            num_labels=3,
        )
    )
    with pytest.raises(ValueError, match="num_labels"):
        spartan.load_memory(three_labels, folder)
    assert not spartan.is_wrapped(three_labels)


def test_missing_and_corrupt_files_are_clear_errors(tmp_path):
    _, _, folder = trained_task(tmp_path, "task", seed=1)
    with pytest.raises(FileNotFoundError, match="not a spartan memory checkpoint"):
        spartan.load_memory(tiny("bert"), tmp_path / "nowhere")
    weights = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        spartan.load_memory(tiny("bert"), folder)
    (folder / WEIGHTS_NAME).write_bytes(weights)
    description = json.loads((folder / CONFIG_NAME).read_text())
    description["checkpoint_id"] = "another save"
    (folder / CONFIG_NAME).write_text(json.dumps(description))
    with pytest.raises(ValueError, match="different saves"):
        spartan.load_memory(tiny("bert"), folder)
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        spartan.load_memory(tiny("bert"), folder)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    logits, inputs, folder = trained_task(tmp_path, "task", seed=1)
    model = spartan.wrap_model(tiny("bert", seed=5), num_parents=8, top_k=3, value_init="normal")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("spartan.checkpoint.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        spartan.save_memory(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary left
    assert torch.equal(spartan.load_memory(tiny("bert"), folder)(**inputs).logits, logits)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    _, _, folder = trained_task(tmp_path, "task", seed=1)

    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickles)
    spartan.load_memory(tiny("bert"), folder)
