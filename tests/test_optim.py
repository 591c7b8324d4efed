"""LazyAdamW and mixed dense/sparse clipping; spartan.train with a sparse-gradient memory, resumed exactly."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import spartan
from spartan.training import TrainingConfig, train
from spartan.training.optim import LazyAdamW, clip_grad_norm
from tests.test_training import assert_same_tensors
from tests.tiny_models import tiny
from tests.toy_data import CrashingDataset, Interrupted, accuracy, toy_dataset


def test_dense_gradients_step_exactly_as_adamw():
    torch.manual_seed(0)
    first, second = torch.nn.Parameter(torch.randn(5, 3)), None
    second = torch.nn.Parameter(first.detach().clone())
    ours, theirs = LazyAdamW([first], lr=0.1, weight_decay=0.05), torch.optim.AdamW([second], lr=0.1, weight_decay=0.05)
    for step in range(4):
        grad = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
        first.grad, second.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(first, second)


def test_sparse_gradients_step_exactly_as_sparse_adam():
    torch.manual_seed(0)
    first = torch.nn.Parameter(torch.randn(8, 3))
    second = torch.nn.Parameter(first.detach().clone())
    ours, theirs = LazyAdamW([first], lr=0.1, weight_decay=0.0), torch.optim.SparseAdam([second], lr=0.1)
    for step, rows in enumerate([[1, 4], [4, 6, 6], [0, 1]]):
        values = torch.randn(len(rows), 3, generator=torch.Generator().manual_seed(step))
        grad = torch.sparse_coo_tensor(torch.tensor([rows]), values, (8, 3))
        first.grad, second.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(first, second)
    untouched = [2, 3, 5, 7]
    assert torch.equal(first.detach()[untouched], second.detach()[untouched])


def test_clipping_treats_sparse_and_dense_gradients_as_one_vector():
    dense, table = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4, 2))
    dense.grad = torch.tensor([3.0, 0.0, 0.0])
    table.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1]]), torch.tensor([[2.0, 0.0], [2.0, 0.0]]), (4, 2))
    norm = clip_grad_norm([dense, table], max_norm=1.0)
    torch.testing.assert_close(norm, torch.tensor(5.0))  # sqrt(3^2 + (2 + 2)^2)
    torch.testing.assert_close(dense.grad, torch.tensor([0.6, 0.0, 0.0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(table.grad.to_dense()[1], torch.tensor([0.8, 0.0]), atol=1e-5, rtol=1e-5)


def sparse_memory_bert():
    return spartan.wrap_model(
        tiny("bert"), num_parents=16, children_per_parent=2, top_k=2, parent_keys="product",
        implementation="sparse", sparse_gradients=True, value_init="normal",
    )


def test_train_steps_sparse_gradients_lazily_and_resumes_exactly(tmp_path):
    train_data, eval_data = toy_dataset(48), toy_dataset(16, seed=1)
    options = dict(learning_rate=5e-2, num_epochs=2, batch_size=8, log_every_steps=2, progress=False,
                   eval_every_steps=3, parameter_learning_rates={"*memories*.values": 1e-1})
    reference_model = sparse_memory_bert()
    before = {k: v.detach().clone() for k, v in spartan.task_state_dict(reference_model).items()}
    reference = train(reference_model, train_data, eval_data, TrainingConfig(str(tmp_path / "a"), **options), accuracy)
    after = spartan.task_state_dict(reference_model)
    losses = [record["loss"] for record in reference.log_history if "loss" in record]
    assert losses and all(math.isfinite(loss) for loss in losses)
    changed = (after["memories.0.values"] != before["memories.0.values"]).any(dim=1)
    assert 0 < changed.sum() < len(changed)  # the rows read moved, the others did not (lazy)

    config = TrainingConfig(str(tmp_path / "b"), **options)
    with pytest.raises(Interrupted):
        train(sparse_memory_bert(), CrashingDataset(train_data, crash_after=48 + 5 * 8), eval_data, config, accuracy)
    resumed_model = sparse_memory_bert()
    resumed = train(resumed_model, train_data, eval_data, config, accuracy)
    assert resumed.global_step == reference.global_step
    assert_same_tensors(
        load_file(resumed.last_checkpoint / "trainable_weights.safetensors"),
        load_file(reference.last_checkpoint / "trainable_weights.safetensors"),
    )
    saved = json.loads((Path(config.output_dir) / "last" / "training_state.json").read_text())
    assert saved["progress"]["global_step"] == reference.global_step
