"""Mixed-task batches: each row read by its own task's memories, norms and head."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import spartan
from spartan.multitask import (
    TEMPERATURE,
    RowTasks,
    forward_tasks,
    graph_shapes,
    graph_tensors,
    memory_shape,
    output_layers,
    task_tensors,
)
from tests.tiny_models import batch, tiny


def tiny_bert(num_labels, seed=0, **config):
    torch.manual_seed(seed)
    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=99)
    return BertForSequenceClassification(BertConfig(**settings, num_labels=num_labels, **config)).eval()


def randomise_task(model, name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in spartan.task_state_dict(model, name).values():
            tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))


def three_task_backbone():
    model = spartan.wrap_model(tiny_bert(2), num_parents=6, top_k=2, value_init="normal", name="pairs")
    spartan.add_memory(model, "nli", num_parents=6, top_k=2, value_init="normal", temperature=0.7, num_labels=3)
    spartan.add_memory(model, "score", num_parents=6, top_k=2, value_init="normal", num_labels=1,
                       problem_type="regression")
    for seed, name in enumerate(spartan.memory_names(model)):
        randomise_task(model, name, seed)
    return model.eval()


def test_each_row_is_read_by_its_own_task():
    model = three_task_backbone()
    inputs = {key: value for key, value in batch(batch_size=5, length=7).items() if key != "labels"}
    tasks = ["nli", "pairs", "score", "nli", "pairs"]
    with torch.no_grad():
        mixed = forward_tasks(model, tasks, **inputs).logits
        assert mixed.shape == (5, 3)
        for row, name in enumerate(tasks):
            spartan.set_active_memory(model, name)
            alone = model(**{key: value[row : row + 1] for key, value in inputs.items()}).logits[0]
            torch.testing.assert_close(mixed[row, : len(alone)], alone, atol=1e-5, rtol=1e-5)
            assert torch.isnan(mixed[row, len(alone) :]).all()


def assert_each_row_reads_its_task(model, tasks):
    """Tasks "a" and "b" randomised; each row of a mixed batch equals its own task's logits alone."""
    randomise_task(model, "a", 0)
    randomise_task(model, "b", 1)
    inputs = {key: value for key, value in batch().items() if key != "labels"}
    with torch.no_grad():
        mixed = forward_tasks(model.eval(), tasks, **inputs).logits
        for row, name in enumerate(tasks):
            spartan.set_active_memory(model, name)
            alone = model(**{key: value[row : row + 1] for key, value in inputs.items()}).logits[0]
            torch.testing.assert_close(mixed[row], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "distilbert", "roberta"])
def test_mixed_batches_on_other_architectures(architecture):
    model = spartan.wrap_model(tiny(architecture), num_parents=4, top_k=2, value_init="normal", name="a")
    spartan.add_memory(model, "b", num_parents=4, top_k=2, value_init="normal")
    assert_each_row_reads_its_task(model, ["b", "a", "b"])


def test_mixed_batches_are_refused_clearly():
    model = three_task_backbone()
    inputs = {key: value for key, value in batch().items() if key != "labels"}
    with pytest.raises(ValueError, match="no memory named"):
        forward_tasks(model, ["pairs", "nope", "pairs"], **inputs)
    with pytest.raises(ValueError, match="one task per row"):
        forward_tasks(model, ["pairs"], **inputs)
    spartan.add_memory(model, "big", num_parents=8, top_k=2)
    with pytest.raises(ValueError, match="one memory shape"):
        forward_tasks(model, ["pairs", "big", "pairs"], **inputs)
    model.train()
    with pytest.raises(ValueError, match="model.eval"):
        forward_tasks(model, ["pairs"] * 3, **inputs)


def test_product_key_memories_read_per_row():
    model = spartan.wrap_model(tiny_bert(2), num_parents=9, top_k=2, value_init="normal", parent_keys="product",
                               implementation="dense", name="a")
    spartan.add_memory(model, "b", num_parents=9, top_k=2, value_init="normal", parent_keys="product",
                       implementation="dense")
    assert_each_row_reads_its_task(model, ["b", "a", "a"])


def test_mixed_batches_compute_no_loss():
    model = three_task_backbone()
    inputs = batch()
    with pytest.raises(ValueError, match="leave labels out"):
        forward_tasks(model, ["pairs"] * 3, **inputs)


def test_the_graph_layout_folds_the_temperature_and_pads_the_head():
    model = three_task_backbone()
    tensors = task_tensors(model, "nli")  # temperature 0.7, three labels
    padded = output_layers(model)
    graph = graph_tensors(tensors, graph_shapes(tensors, padded, max_labels=5), padded, num_parents=6)
    assert TEMPERATURE not in graph
    keys = graph["memories.0.keys"][0]
    assert torch.equal(keys[:6], tensors["memories.0.keys"][:6])  # the parent keys as they are
    torch.testing.assert_close(keys[6:], tensors["memories.0.keys"][6:] / 0.7)
    head = graph["modules.classifier.weight"]
    assert head.shape == (1, 5, 32) and torch.equal(head[0, :3], tensors["modules.classifier.weight"])
    assert not head[0, 3:].any()
    norm = "modules.bert.encoder.layer.0.output.LayerNorm.weight"
    assert graph[norm].shape == (1, 1, 32)
    shapes = graph_shapes(tensors, padded, max_labels=5)
    shapes["memories.0.values"] = [7, 32]
    with pytest.raises(ValueError, match=r"memories.0.values has shape \[18, 32\]; this graph takes \[7, 32\]"):
        graph_tensors(tensors, shapes, padded, num_parents=6)


def test_one_row_of_graph_tensors_is_read_by_every_row():
    model = three_task_backbone()
    tensors = task_tensors(model, "nli")
    padded = output_layers(model)
    rows = RowTasks(model, memory_shape(model, "nli"))
    rows.tensors = graph_tensors(tensors, graph_shapes(tensors, padded, max_labels=3), padded, num_parents=6)
    rows.task_ids = None
    inputs = {key: value for key, value in batch(batch_size=4).items() if key != "labels"}
    with torch.no_grad():
        with rows.active():
            broadcast = model(**inputs).logits
        spartan.set_active_memory(model, "nli")
        torch.testing.assert_close(broadcast, model(**inputs).logits, atol=1e-5, rtol=1e-5)
