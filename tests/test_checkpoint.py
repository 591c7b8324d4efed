"""Memory-only checkpoints and many tasks on one backbone."""

import json

import pytest
import torch
from tests.tiny_models import batch, tiny

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
        f"modules.bert.encoder.layer.{i}.{n}.LayerNorm." for i in range(2) for n in ("attention.output", "output")
    )
    assert all(key.startswith(("memories.", "modules.classifier.", *norms)) for key in tensors)
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


def tiny_bert_with_labels(num_labels, seed=0, **config):
    torch.manual_seed(seed)
    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=99)
    return BertForSequenceClassification(BertConfig(**settings, num_labels=num_labels, **config)).eval()


def test_tasks_with_different_label_counts_share_one_backbone(tmp_path):
    inputs = {key: value for key, value in batch(seed=3).items() if key != "labels"}
    saved = {}
    for name, num_labels, problem_type in [
        ("pairs", 2, None),
        ("nli", 3, "single_label_classification"),
        ("similarity", 1, "regression"),
    ]:
        model = spartan.wrap_model(
            tiny_bert_with_labels(num_labels, problem_type=problem_type), num_parents=8, top_k=3, name=name
        )
        model.train()
        labels = torch.rand(3) if problem_type == "regression" else torch.randint(0, num_labels, (3,))
        train_a_few_steps(model, {**inputs, "labels": labels})
        saved[name] = (spartan.save_memory(model, tmp_path / name), model(**inputs).logits.detach())
    backbone = tiny_bert_with_labels(2)  # the shared backbone has a 2-label head of its own
    for name, (folder, _) in saved.items():
        spartan.load_memory(backbone, folder)
    assert spartan.memory_names(backbone) == ["pairs", "nli", "similarity"]
    for name, (_, logits) in saved.items():
        spartan.set_active_memory(backbone, name)
        assert torch.equal(backbone(**inputs).logits, logits), name
        assert backbone.config.num_labels == logits.shape[-1]
    assert spartan.get_task_labels(backbone, "similarity").problem_type == "regression"
    backbone.train()  # the regression task trains with a regression loss
    loss = backbone(**inputs, labels=torch.rand(3)).loss
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_a_checkpoint_saved_with_explicit_layers_loads(tmp_path):
    logits, inputs, folder = trained_task(tmp_path, "task", seed=1, layers="bert.encoder.layer")
    restored = spartan.load_memory(tiny("bert"), folder)
    assert torch.equal(restored(**inputs).logits, logits)
    assert json.loads((folder / CONFIG_NAME).read_text())["backbone"]["layers"] == [
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
    ]


def test_a_flipped_byte_and_an_unknown_format_are_refused(tmp_path):
    _, _, folder = trained_task(tmp_path, "task", seed=1)
    weights = bytearray((folder / WEIGHTS_NAME).read_bytes())
    weights[-5] ^= 0x01
    (folder / WEIGHTS_NAME).write_bytes(bytes(weights))
    with pytest.raises(ValueError, match="checksum"):
        spartan.load_memory(tiny("bert"), folder)
    _, _, folder = trained_task(tmp_path, "other", seed=1)
    description = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps(description | {"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99.*upgrade spartan"):
        spartan.load_memory(tiny("bert"), folder)


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"config": None}, "config"),
        ({"backbone": "nonsense"}, "backbone"),
        ({"backbone": {}}, "backbone.hidden_size"),
        ({"backbone": {"hidden_size": "many", "num_layers": 2}}, "backbone.hidden_size"),
        ({"config": {"num_parents": "x"}}, "num_parents"),
        ({"task": {"num_labels": 0}}, "num_labels"),
    ],
)
def test_hand_edited_descriptions_name_the_field(tmp_path, edit, field):
    _, _, folder = trained_task(tmp_path, "task", seed=1)
    description = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps(description | edit))
    with pytest.raises(ValueError, match=field) as error:
        spartan.load_memory(tiny("bert"), folder)
    assert "\n" not in str(error.value)


def test_memory_shape_mismatch_blames_the_config_not_the_labels(tmp_path):
    _, _, folder = trained_task(tmp_path, "task", seed=1)
    description = json.loads((folder / CONFIG_NAME).read_text())
    description["config"]["num_parents"] = 4
    description["config"]["top_k"] = 2
    (folder / CONFIG_NAME).write_text(json.dumps(description))
    with pytest.raises(ValueError, match="memory config") as error:
        spartan.load_memory(tiny("bert"), folder)
    assert "labels" not in str(error.value)


def test_version_1_checkpoints_load(tmp_path):
    from safetensors.torch import save_file

    logits, inputs, folder = trained_task(tmp_path, "task", seed=1)
    description, tensors = spartan.read_checkpoint(folder)
    old = {}
    for key, value in tensors.items():
        if key.startswith("modules."):
            old["head." + key[len("modules."):]] = value
    model = spartan.load_memory(tiny("bert"), folder)
    for index, memory in enumerate(spartan.get_memories(model)):
        old[f"memories.{index}.parent_keys"] = memory.parent_keys.detach().contiguous()
        old[f"memories.{index}.child_keys"] = memory.child_keys.detach().contiguous()
        old[f"memories.{index}.child_values"] = memory.child_values.detach().contiguous()
    v1 = tmp_path / "v1"
    v1.mkdir()
    save_file(old, v1 / WEIGHTS_NAME, metadata={"checkpoint_id": "abc"})
    raw = json.loads((folder / CONFIG_NAME).read_text())
    legacy = {
        "format_version": 1,
        "checkpoint_id": "abc",
        "name": "task",
        "config": raw["config"],
        "backbone": {key: raw["backbone"][key] for key in ("model_type", "hidden_size", "num_layers")},
    }
    (v1 / CONFIG_NAME).write_text(json.dumps(legacy))
    assert torch.equal(spartan.load_memory(tiny("bert"), v1)(**inputs).logits, logits)


def test_task_names_must_be_module_names():
    model = tiny("bert")
    for name in ["", "a.b", "two words"]:
        with pytest.raises(ValueError, match="letters, digits"):
            spartan.wrap_model(model, name=name)
    spartan.wrap_model(model)
    with pytest.raises(ValueError, match="letters, digits"):
        spartan.add_memory(model, "a.b")


def test_inactive_tasks_follow_the_model_and_are_in_its_state_dict():
    model = spartan.wrap_model(tiny("bert"), num_parents=4, top_k=2)
    spartan.add_memory(model, "other", num_parents=4, top_k=2)
    assert any(key.startswith("spartan_task_modules.other.") for key in model.state_dict())
    model.to(torch.float64)
    spartan.set_active_memory(model, "other")
    inputs = {key: value for key, value in batch().items() if key != "labels"}
    assert model(**inputs).logits.dtype == torch.float64
    spartan.set_active_memory(model, "default")
    assert model(**inputs).logits.dtype == torch.float64


def test_checkpoint_files_get_ordinary_permissions(tmp_path):
    import os

    _, _, folder = trained_task(tmp_path, "task", seed=1)
    umask = os.umask(0)
    os.umask(umask)
    for file in (folder / CONFIG_NAME, folder / WEIGHTS_NAME):
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_crash_between_the_renames_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    logits, inputs, folder = trained_task(tmp_path, "task", seed=1)
    model = spartan.wrap_model(tiny("bert", seed=5), num_parents=8, top_k=3, value_init="normal")
    import os

    real_replace, calls = os.replace, []

    def crash_on_second(source, target):
        calls.append(target)
        if str(target) == str(folder):  # the staging folder is about to take the old one's place
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        spartan.save_memory(model, folder)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not folder.exists()  # the old folder was moved aside, the new one not yet in
    assert torch.equal(spartan.load_memory(tiny("bert"), folder)(**inputs).logits, logits)


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
    assert sorted(p.name for p in folder.parent.iterdir()) == ["task"]  # no staging folder left
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert torch.equal(spartan.load_memory(tiny("bert"), folder)(**inputs).logits, logits)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    _, _, folder = trained_task(tmp_path, "task", seed=1)

    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickles)
    spartan.load_memory(tiny("bert"), folder)


def test_task_weights_saved_under_other_settings_are_refused(tmp_path):
    _, _, folder = trained_task(tmp_path, "task", seed=1)
    other = spartan.wrap_model(tiny("bert"), num_parents=8, top_k=2)
    with pytest.raises(ValueError, match="top_k: 3 saved, 2 here"):
        spartan.load_task_weights(other, folder)
