"""SparseHierarchicalMemory: both implementations against a plain per-token reference."""

import pytest
import torch

from spartan import SparseHierarchicalMemory, load_balancing_loss
from spartan.memory import Routing


def reference_read(memory: SparseHierarchicalMemory, hidden: torch.Tensor) -> torch.Tensor:
    """The method as written in the paper, one token at a time."""
    out = torch.zeros_like(hidden)
    for n, h in enumerate(hidden):
        parent_logits = memory.parent_keys @ h
        top_logits, top_parents = parent_logits.topk(memory.top_k)
        parent_weights = torch.softmax(top_logits, dim=0)
        for weight, parent in zip(parent_weights, top_parents):
            child_weights = torch.softmax(memory.child_keys[parent] @ h / memory.temperature, dim=0)
            out[n] = out[n] + weight * (child_weights @ memory.child_values[parent])
    return out


def make_pair(hidden=24, parents=10, children=4, top_k=3, temperature=1.6, seed=0):
    torch.manual_seed(seed)
    dense = SparseHierarchicalMemory(hidden, parents, children, top_k, temperature, "normal", "dense").double()
    sparse = SparseHierarchicalMemory(hidden, parents, children, top_k, temperature, "normal", "sparse").double()
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


@pytest.mark.parametrize("implementation", ["dense", "sparse", "sparse in chunks"])
def test_forward_and_gradients_match_reference(implementation):
    dense, sparse = make_pair()
    memory = dense if implementation == "dense" else sparse
    if implementation == "sparse in chunks":
        memory.chunk_tokens = 4  # 21 tokens: five full chunks and a short one
    hidden = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    out = memory(hidden)
    expected = reference_read(memory, hidden.view(-1, 24)).view_as(hidden)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    params = [hidden, *memory.parameters()]
    grads = torch.autograd.grad(out, params, upstream)
    expected_grads = torch.autograd.grad(expected, params, upstream)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("implementation", ["dense", "sparse"])
def test_unselected_parents_take_no_part(implementation):
    dense, sparse = make_pair(parents=12, top_k=2)
    memory = dense if implementation == "dense" else sparse
    hidden = torch.randn(2, 24, dtype=torch.float64)
    out = memory(hidden)
    selected = set(memory.last_routing.indices.flatten().tolist())
    unselected = next(p for p in range(12) if p not in selected)
    with torch.no_grad():
        memory.child_keys[unselected].add_(torch.randn(4, 24, dtype=torch.float64))
        memory.child_values[unselected].add_(torch.randn(4, 24, dtype=torch.float64))
    perturbed = memory(hidden)
    assert torch.equal(out, perturbed)
    perturbed.square().sum().backward()
    assert torch.count_nonzero(memory.child_keys.grad[unselected]) == 0
    assert torch.count_nonzero(memory.child_values.grad[unselected]) == 0
    assert torch.count_nonzero(memory.child_values.grad[next(iter(selected))]) > 0


@pytest.mark.parametrize("implementation", ["dense", "sparse", "sparse in chunks"])
def test_residual_is_added_to_the_read_out(implementation):
    dense, sparse = make_pair()
    memory = dense if implementation == "dense" else sparse
    if implementation == "sparse in chunks":
        memory.chunk_tokens = 4
    hidden = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    residual = torch.randn_like(hidden)
    torch.testing.assert_close(memory(hidden, residual=residual), residual + memory(hidden))
    fused = torch.autograd.grad(memory(hidden, residual=hidden).sum(), hidden)[0]
    torch.testing.assert_close(fused, torch.autograd.grad((hidden + memory(hidden)).sum(), hidden)[0])
    with pytest.raises(ValueError, match="residual has shape"):
        memory(hidden, residual=residual[:, :2])


def test_inference_reuses_the_layout_until_a_parameter_or_the_temperature_changes():
    dense, _ = make_pair()
    hidden = torch.randn(5, 24, dtype=torch.float64)

    def check() -> None:
        with torch.no_grad():
            torch.testing.assert_close(dense(hidden), reference_read(dense, hidden))
        with torch.inference_mode():
            torch.testing.assert_close(dense(hidden), reference_read(dense, hidden))

    check()
    cached = dense._dense_cache
    check()
    assert dense._dense_cache is cached  # nothing changed: the layout was reused
    with torch.no_grad():
        dense.child_values.mul_(2.0)  # an optimizer step or load_state_dict writes in place
    check()
    dense.temperature = 0.5
    check()
    dense.child_keys.data = torch.randn(10, 4, 24, dtype=torch.float64)  # replaced, not written in place
    check()
    dense.float()
    with torch.no_grad():
        torch.testing.assert_close(dense(hidden.float()), reference_read(dense, hidden.float()))
    out = dense(hidden.float())  # gradients flow again: built fresh and differentiable
    assert out.requires_grad


def test_zero_init_reads_exactly_zero():
    memory = SparseHierarchicalMemory(16, 8, 3, 4)
    assert torch.count_nonzero(memory(torch.randn(5, 16))) == 0
    assert torch.count_nonzero(SparseHierarchicalMemory(16, 8, 3, 4, value_init="normal")(torch.randn(5, 16))) > 0


def test_routing_is_recorded_with_input_shape():
    memory = SparseHierarchicalMemory(16, 8, 3, 4)
    memory(torch.randn(2, 5, 16))
    assert memory.last_routing.indices.shape == (2, 5, 4)
    torch.testing.assert_close(memory.last_routing.weights.sum(-1), torch.ones(2, 5))


def test_auto_picks_implementation_by_size():
    assert SparseHierarchicalMemory(8, 16, 3, 8).implementation == "dense"
    assert SparseHierarchicalMemory(8, 256, 256, 8).implementation == "sparse"


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        (dict(top_k=9), "top_k"),
        (dict(num_parents=0), "num_parents"),
        (dict(children_per_parent=-1), "children_per_parent"),
        (dict(temperature=0.0), "temperature"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(implementation="fast"), "implementation"),
        (dict(chunk_tokens=0), "chunk_tokens"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, parameter):
    arguments = dict(hidden_size=16, num_parents=8, children_per_parent=3, top_k=4) | kwargs
    with pytest.raises(ValueError, match=parameter):
        SparseHierarchicalMemory(**arguments)


def test_wrong_hidden_size_is_a_clear_error():
    with pytest.raises(ValueError, match="hidden_size=16"):
        SparseHierarchicalMemory(16, 8, 3, 4)(torch.randn(2, 12))


@pytest.mark.parametrize("implementation", ["dense", "sparse"])
def test_bf16_autocast_is_close_to_fp32(implementation):
    torch.manual_seed(0)
    memory = SparseHierarchicalMemory(32, 8, 3, 4, value_init="normal", implementation=implementation)
    hidden = torch.randn(4, 6, 32)
    expected = memory(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = memory(hidden)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        memory(hidden).float().sum().backward()
    assert memory.child_values.grad is not None and memory.child_values.grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("implementation", ["dense", "sparse"])
def test_cuda_matches_cpu(implementation):
    torch.manual_seed(0)
    memory = SparseHierarchicalMemory(32, 8, 3, 4, value_init="normal", implementation=implementation)
    hidden = torch.randn(4, 6, 32)
    expected = memory(hidden)
    torch.testing.assert_close(memory.cuda()(hidden.cuda()).cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["dense", "sparse"])
def test_torch_compile_matches_eager(implementation):
    torch.manual_seed(0)
    memory = SparseHierarchicalMemory(32, 8, 3, 4, value_init="normal", implementation=implementation)
    hidden = torch.randn(4, 6, 32, requires_grad=True)
    compiled = torch.compile(memory)
    out = compiled(hidden)
    torch.testing.assert_close(out, memory(hidden))
    (grad,) = torch.autograd.grad(out.sum(), hidden)
    (expected_grad,) = torch.autograd.grad(memory(hidden).sum(), hidden)
    torch.testing.assert_close(grad, expected_grad)
    with torch.no_grad():  # inference: the dense path reuses its cached layout inside the compiled graph
        torch.testing.assert_close(compiled(hidden), memory(hidden))
        memory.child_values.mul_(2.0)
        torch.testing.assert_close(compiled(hidden), memory(hidden))


def test_load_balancing_loss_matches_definition_and_ignores_padding():
    indices = torch.tensor([[[0, 1], [2, 3], [0, 0]]])  # [B=1, T=3, k=2]; the last token is padding
    weights = torch.tensor([[[0.75, 0.25], [0.5, 0.5], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    loss = load_balancing_loss(Routing(indices, weights), num_parents=4, mask=mask)
    usage = torch.tensor([0.75, 0.25, 0.5, 0.5]) / 2
    torch.testing.assert_close(loss, usage.square().sum() / 4)
    balanced = load_balancing_loss(Routing(torch.tensor([[0], [1]]), torch.ones(2, 1)), num_parents=2)
    collapsed = load_balancing_loss(Routing(torch.tensor([[0], [0]]), torch.ones(2, 1)), num_parents=2)
    assert balanced < collapsed
