"""SparseHierarchicalMemory: both implementations against a plain per-token reference."""

import pytest
import torch

from spartan import SparseHierarchicalMemory, load_balancing_loss
from spartan.memory import Routing, sparse_read


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


@pytest.mark.parametrize("implementation", ["dense", "sparse", "sparse, gradients in small blocks"])
def test_forward_and_gradients_match_reference(implementation, monkeypatch):
    dense, sparse = make_pair()
    memory = dense if implementation == "dense" else sparse
    if implementation == "sparse, gradients in small blocks":
        monkeypatch.setattr("spartan.memory.GRADIENT_BLOCK_BYTES", 3 * 24 * 8)  # three rows per block
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
    child_key_grads = memory.split_keys(memory.keys.grad)[1]
    child_value_grads = memory.split_values(memory.values.grad)
    assert torch.count_nonzero(child_key_grads[unselected]) == 0
    assert torch.count_nonzero(child_value_grads[unselected]) == 0
    assert torch.count_nonzero(child_value_grads[next(iter(selected))]) > 0


@pytest.mark.parametrize("implementation", ["dense", "sparse"])
def test_unselected_children_get_zero_gradient_from_a_non_finite_upstream(implementation):
    dense, sparse = make_pair(parents=12, top_k=2)
    memory = dense if implementation == "dense" else sparse
    hidden = torch.randn(2, 24, dtype=torch.float64)
    out = memory(hidden)
    selected = set(memory.last_routing.indices.flatten().tolist())
    upstream = torch.full_like(out, float("inf"))
    out.backward(upstream)
    child_key_grads = memory.split_keys(memory.keys.grad)[1]
    child_value_grads = memory.split_values(memory.values.grad)
    for parent in range(12):
        if parent not in selected:
            assert torch.equal(child_key_grads[parent], torch.zeros_like(child_key_grads[parent]))
            assert torch.equal(child_value_grads[parent], torch.zeros_like(child_value_grads[parent]))


@pytest.mark.parametrize("implementation", ["dense", "sparse"])
def test_residual_is_added_to_the_read_out(implementation):
    dense, sparse = make_pair()
    memory = dense if implementation == "dense" else sparse
    hidden = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    residual = torch.randn_like(hidden)
    torch.testing.assert_close(memory(hidden, residual=residual), residual + memory(hidden))
    fused = torch.autograd.grad(memory(hidden, residual=hidden).sum(), hidden)[0]
    torch.testing.assert_close(fused, torch.autograd.grad((hidden + memory(hidden)).sum(), hidden)[0])
    with pytest.raises(ValueError, match="residual has shape"):
        memory(hidden, residual=residual[:, :2])


def _write_by_fused_adamw(memory):
    memory(torch.randn(4, 24, dtype=torch.float64)).square().sum().backward()
    torch.optim.AdamW(memory.parameters(), lr=0.1, fused=True).step()


def _write_by_data_copy(memory):
    memory.values.data.copy_(torch.randn_like(memory.values))


def _write_through_numpy(memory):
    memory.values.detach().numpy()[:] = 1.0


def _write_by_load_state_dict(memory):
    state = {name: torch.randn_like(tensor) for name, tensor in memory.state_dict().items()}
    memory.load_state_dict(state)


@pytest.mark.parametrize(
    "write", [_write_by_fused_adamw, _write_by_data_copy, _write_through_numpy, _write_by_load_state_dict]
)
def test_no_write_to_a_parameter_leaves_a_stale_read(write):
    dense, _ = make_pair()
    hidden = torch.randn(5, 24, dtype=torch.float64)
    with torch.no_grad():
        before = dense(hidden)
    write(dense)
    with torch.no_grad():
        after = dense(hidden)
        assert not torch.equal(before, after)
        torch.testing.assert_close(after, reference_read(dense, hidden))
    with torch.inference_mode():
        torch.testing.assert_close(dense(hidden), reference_read(dense, hidden))


def test_version_1_state_dicts_load():
    dense, _ = make_pair()
    old = {
        "parent_keys": dense.parent_keys.detach().clone(),
        "child_keys": dense.child_keys.detach().clone(),
        "child_values": dense.child_values.detach().clone(),
    }
    fresh = SparseHierarchicalMemory(24, 10, 4, 3, 1.6, "normal", "dense").double()
    fresh.load_state_dict(old)
    hidden = torch.randn(5, 24, dtype=torch.float64)
    torch.testing.assert_close(fresh(hidden), dense(hidden))
    torch.testing.assert_close(fresh.child_keys, old["child_keys"])


@pytest.mark.parametrize("implementation", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_the_residual_stream_in_its_dtype(implementation, dtype):
    memory = SparseHierarchicalMemory(32, 8, 3, 4, implementation=implementation)  # zero values: reads zero
    hidden = torch.randn(4, 6, 32)
    with torch.autocast("cpu", dtype=dtype):
        out = memory(hidden, residual=hidden)
    assert out.dtype == torch.float32
    assert torch.equal(out, hidden)


@pytest.mark.parametrize("implementation", ["dense", "sparse"])
def test_zero_tokens_read_an_empty_result(implementation):
    memory = SparseHierarchicalMemory(16, 8, 3, 4, value_init="normal", implementation=implementation)
    hidden = torch.randn(0, 5, 16)
    assert memory(hidden).shape == (0, 5, 16)
    assert memory(hidden, residual=hidden).shape == (0, 5, 16)
    assert memory.last_routing.indices.shape == (0, 5, 4)


def test_dense_path_traces_for_every_shape():
    torch.manual_seed(0)
    memory = SparseHierarchicalMemory(16, 8, 3, 4, value_init="normal", implementation="dense").eval()
    with torch.no_grad():
        example = torch.randn(2, 5, 16)
        traced = torch.jit.trace(memory, (example, example))
        for shape in [(1, 1, 16), (3, 9, 16)]:
            other = torch.randn(shape)
            torch.testing.assert_close(traced(other, other), memory(other, residual=other))


def test_dense_path_exports_with_dynamic_shapes():
    torch.manual_seed(0)
    memory = SparseHierarchicalMemory(16, 8, 3, 4, value_init="normal", implementation="dense").eval()
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    with torch.no_grad():
        program = torch.export.export(memory, (torch.randn(2, 5, 16),), dynamic_shapes=({0: batch, 1: length},))
        for shape in [(1, 1, 16), (3, 9, 16)]:
            other = torch.randn(shape)
            torch.testing.assert_close(program.module()(other), memory(other))


def test_sparse_path_refuses_tracing_and_export():
    memory = SparseHierarchicalMemory(16, 8, 3, 4, implementation="sparse").eval()
    with pytest.raises(RuntimeError, match="implementation='dense'"):
        torch.jit.trace(memory, torch.randn(2, 5, 16))
    with pytest.raises(Exception, match="implementation='dense'"):
        torch.export.export(memory, (torch.randn(2, 5, 16),))


def test_parent_logits_score_every_parent():
    dense, _ = make_pair()
    hidden = torch.randn(2, 3, 24, dtype=torch.float64)
    logits = dense.parent_logits(hidden)
    assert logits.shape == (2, 3, 10)
    torch.testing.assert_close(logits, torch.einsum("bth,ph->btp", hidden, dense.parent_keys))
    dense(hidden)
    torch.testing.assert_close(dense.last_routing.indices, logits.topk(3, dim=-1).indices)


def test_zero_init_reads_exactly_zero():
    memory = SparseHierarchicalMemory(16, 8, 3, 4)
    assert torch.count_nonzero(memory(torch.randn(5, 16))) == 0
    assert torch.count_nonzero(SparseHierarchicalMemory(16, 8, 3, 4, value_init="normal")(torch.randn(5, 16))) > 0


def test_routing_is_recorded_with_input_shape():
    memory = SparseHierarchicalMemory(16, 8, 3, 4)
    memory(torch.randn(2, 5, 16))
    assert memory.last_routing.indices.shape == (2, 5, 4)
    torch.testing.assert_close(memory.last_routing.weights.sum(-1), torch.ones(2, 5))


def test_auto_picks_implementation_by_size_and_parent_keys():
    from spartan.memory import DENSE_MAX_SLOTS

    assert SparseHierarchicalMemory(8, 16, 3, 8).implementation == "dense"
    assert SparseHierarchicalMemory(8, 16, DENSE_MAX_SLOTS // 16, 8).implementation == "dense"
    assert SparseHierarchicalMemory(8, 16, DENSE_MAX_SLOTS // 16 + 1, 8).implementation == "sparse"
    assert SparseHierarchicalMemory(8, 16, 3, 8, parent_keys="product").implementation == "dense"
    assert SparseHierarchicalMemory(8, 64, 16, 8, parent_keys="product").implementation == "dense"
    assert SparseHierarchicalMemory(8, 256, 16, 8, parent_keys="product").implementation == "sparse"


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        (dict(top_k=9), "top_k"),
        (dict(num_parents=0), "num_parents"),
        (dict(children_per_parent=-1), "children_per_parent"),
        (dict(temperature=0.0), "temperature"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(implementation="fast"), "implementation"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=True), "temperature"),
        (dict(temperature=1e-300), "temperature"),  # would divide the child logits into inf, then NaN
        (dict(top_k="many"), "top_k"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, parameter):
    arguments = dict(hidden_size=16, num_parents=8, children_per_parent=3, top_k=4) | kwargs
    with pytest.raises(ValueError, match=parameter):
        SparseHierarchicalMemory(**arguments)


def test_numpy_and_string_numbers_are_taken():
    import numpy as np

    memory = SparseHierarchicalMemory(np.int64(16), np.int64(8), "3", 4, temperature="1.6")
    assert (memory.hidden_size, memory.num_parents, memory.children_per_parent) == (16, 8, 3)
    assert memory.temperature == 1.6 and type(memory.num_parents) is int
    assert memory.keys.shape == (8 + 24, 16)
    assert sum(p.numel() for p in memory.parameters()) == SparseHierarchicalMemory.parameter_count(16, 8, 3)


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
    assert memory.values.grad is not None and memory.values.grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("implementation", ["dense", "sparse"])
@pytest.mark.parametrize("parent_keys", ["flat", "product"])
def test_cuda_matches_cpu(implementation, parent_keys):
    torch.manual_seed(0)
    memory = SparseHierarchicalMemory(
        32, 16, 3, 4, value_init="normal", implementation=implementation, parent_keys=parent_keys
    )
    memory.sparse_gradients = implementation == "sparse" and parent_keys == "product"
    hidden = torch.randn(4, 6, 32, requires_grad=True)
    expected = memory(hidden)
    expected_grads = torch.autograd.grad(expected.square().sum(), [hidden, memory.keys, memory.values])
    on_gpu, hidden_gpu = memory.cuda(), hidden.detach().cuda().requires_grad_()
    out = on_gpu(hidden_gpu)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(out.square().sum(), [hidden_gpu, on_gpu.keys, on_gpu.values])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.cpu().to_dense(), expected_grad.to_dense(), atol=1e-4, rtol=1e-4)


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


def make_product_pair(hidden=16, side=4, children=3, top_k=3, temperature=1.3, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(value_init="normal", parent_keys="product")
    dense = SparseHierarchicalMemory(hidden, side * side, children, top_k, temperature, implementation="dense", **kwargs)
    sparse = SparseHierarchicalMemory(hidden, side * side, children, top_k, temperature, implementation="sparse", **kwargs)
    dense, sparse = dense.double(), sparse.double()
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def test_product_top_k_is_exact_against_brute_force():
    from spartan.memory import product_top_k

    torch.manual_seed(0)
    memory = SparseHierarchicalMemory(32, 64, 2, 8, parent_keys="product").double()
    hidden = torch.randn(500, 32, dtype=torch.float64)
    brute = memory.parent_logits(hidden)  # [N, 64], scored one parent at a time
    torch.testing.assert_close(brute, hidden @ memory.parent_keys.T)
    ids, logits = product_top_k(hidden, memory.sub_keys, 8)
    expected_logits, expected_ids = brute.topk(8, dim=-1)
    torch.testing.assert_close(logits, expected_logits)
    assert torch.equal(ids, expected_ids)


@pytest.mark.parametrize("implementation", ["dense", "sparse"])
def test_product_key_memory_matches_the_reference(implementation):
    dense, sparse = make_product_pair()
    memory = dense if implementation == "dense" else sparse
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    out = memory(hidden)
    expected = reference_read(memory, hidden.view(-1, 16)).view_as(hidden)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    params = [hidden, *memory.parameters()]
    for grad, expected_grad in zip(torch.autograd.grad(out, params, upstream), torch.autograd.grad(expected, params, upstream)):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("parent_keys", ["flat", "product"])
def test_sparse_read_passes_gradcheck(parent_keys):
    torch.manual_seed(0)
    memory = SparseHierarchicalMemory(
        8, 9, 2, 2, 1.4, "normal", "sparse", parent_keys=parent_keys
    ).double()
    hidden = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, k, v: memory(h), (hidden, memory.keys, memory.values))


def test_sparse_gradients_hold_only_the_rows_read_and_step_with_sparse_adam():
    dense, sparse = make_product_pair(side=6, children=2, top_k=2)
    sparse.sparse_gradients = True
    hidden = torch.randn(4, 16, dtype=torch.float64)
    dense(hidden).square().sum().backward()
    sparse(hidden).square().sum().backward()
    for name in ("keys", "values"):
        grad = getattr(sparse, name).grad
        assert grad.is_sparse
        torch.testing.assert_close(grad.to_dense(), getattr(dense, name).grad)
        rows = set(grad.coalesce().indices()[0].tolist())
        read = {c * 36 + p for p in sparse.last_routing.indices.flatten().tolist() for c in range(2)}
        assert rows == read
    torch.testing.assert_close(sparse.sub_keys.grad, dense.sub_keys.grad)
    before = sparse.values.detach().clone()
    torch.optim.SparseAdam([sparse.keys, sparse.values], lr=0.1).step()
    changed = (sparse.values.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert set(changed) == rows


def test_large_memories_pick_the_sparse_read():
    memory = SparseHierarchicalMemory(64, 256 * 256, 4, 8, parent_keys="product")
    assert memory.implementation == "sparse"
    hidden = torch.randn(2, 9, 64)
    assert memory(hidden).shape == (2, 9, 64)
    expected = (256 + 2 * 256 * 256 * 4) * 64  # two 256-key half tables, and the children
    assert sum(p.numel() for p in memory.parameters()) == expected
    assert SparseHierarchicalMemory.parameter_count(64, 256 * 256, 4, "product") == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_parents=10, parent_keys="product"), "n \\* n"),
        (dict(hidden_size=15, num_parents=9, parent_keys="product"), "even"),
        (dict(sparse_gradients=True), "sparse_gradients"),
        (dict(parent_keys="tree"), "parent_keys"),
    ],
)
def test_product_key_settings_are_checked(kwargs, message):
    arguments = dict(hidden_size=16, num_parents=16, children_per_parent=3, top_k=4) | kwargs
    with pytest.raises(ValueError, match=message):
        SparseHierarchicalMemory(**arguments)


@pytest.mark.parametrize("sparse_gradients", [False, True])
def test_sparse_read_of_bfloat16_tables_matches_float32_on_the_same_values(sparse_gradients):
    torch.manual_seed(0)
    low = SparseHierarchicalMemory(16, 36, 2, 3, 1.4, "normal", "sparse", parent_keys="product").bfloat16()
    full = SparseHierarchicalMemory(16, 36, 2, 3, 1.4, "normal", "sparse", parent_keys="product")
    full.load_state_dict({name: tensor.float() for name, tensor in low.state_dict().items()})
    low.sparse_gradients = full.sparse_gradients = sparse_gradients
    hidden = torch.randn(5, 16)
    out = low(hidden.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), full(hidden), atol=2e-2, rtol=2e-2)
    out.float().square().sum().backward()
    full(hidden).square().sum().backward()
    for name in ("keys", "values"):
        grad, expected = getattr(low, name).grad, getattr(full, name).grad
        assert grad.dtype == torch.bfloat16 and grad.is_sparse == sparse_gradients
        torch.testing.assert_close(grad.to_dense().float(), expected.to_dense(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sparse_gradients_are_coalesced_and_valid(dtype):
    torch.manual_seed(0)
    memory = SparseHierarchicalMemory(16, 16, 3, 4, 1.4, "normal", "sparse", parent_keys="product").to(dtype)
    memory.sparse_gradients = True
    hidden = torch.randn(7, 16, dtype=dtype, requires_grad=True)
    grads = torch.autograd.grad(memory(hidden).float().square().sum(), [memory.keys, memory.values])
    for grad in grads:  # (the read's own; accumulated into .grad, torch drops the flag)
        # flagged coalesced when built: its row ids must be sorted and distinct, as coalesce() makes them
        assert grad.is_coalesced()
        checked = torch.sparse_coo_tensor(grad.indices(), grad.values(), grad.shape, check_invariants=True)
        assert torch.equal(checked.coalesce().indices(), grad.indices())


def plain_read(tokens, top_indices, parent_weights, child_keys, values, P, C, temperature):
    """The children read with dense tensors: each token's k parents' [C, H] blocks gathered."""
    keys = child_keys.view(C, P, -1).transpose(0, 1)[top_indices]  # [N, k, C, H]
    vals = values.view(C, P, -1).transpose(0, 1)[top_indices]
    child_weights = (torch.einsum("nh,nkch->nkc", tokens, keys) / temperature).softmax(-1)
    return torch.einsum("nk,nkc,nkch->nh", parent_weights, child_weights, vals)


@pytest.mark.parametrize("way", ["token by token, float64", "token by token", "parent by parent"])
@pytest.mark.parametrize("children", [3, 4])
@pytest.mark.parametrize("routing", ["random", "skewed", "one parent"])
def test_sparse_read_matches_a_plain_read_for_any_routing(way, children, routing, monkeypatch):
    grouped_calls = []
    grouped_mm = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: grouped_calls.append(1) or grouped_mm(*a, **k))
    if way == "parent by parent":  # (3-wide rows are padded to 16 bytes for the kernel)
        monkeypatch.setattr("spartan.memory.GROUPED_MIN_TABLE_BYTES", 0)
        monkeypatch.setattr("spartan.memory.GROUPED_MIN_PAIRS_PER_PARENT", 1)
    monkeypatch.setattr("spartan.memory.GRADIENT_BLOCK_BYTES", 2 * children * 16 * 4)  # two parents per block
    dtype = torch.float64 if way.endswith("float64") else torch.float32
    torch.manual_seed(0)
    N, k, P, C, H = 40, 3, 12, children, 16
    tokens = torch.randn(N, H, dtype=dtype, requires_grad=True)
    if routing == "random":
        top_indices = torch.rand(N, P).argsort(-1)[:, :k]
    elif routing == "skewed":  # parent 5 in every token's top-k, the rest spread over a few
        top_indices = torch.stack([torch.full((N,), 5), torch.arange(N) % 3, 6 + torch.arange(N) % 2], dim=1)
    else:  # every token's k parents the same
        top_indices = torch.tensor([7, 2, 9]).expand(N, k)
    parent_weights = torch.randn(N, k, dtype=dtype).softmax(-1).requires_grad_()
    child_keys = torch.randn(C * P, H, dtype=dtype, requires_grad=True)
    values = torch.randn(C * P, H, dtype=dtype, requires_grad=True)
    inputs = (tokens, parent_weights, child_keys, values)
    out = sparse_read(tokens, top_indices, parent_weights, child_keys, values, P, C, 1.3)
    expected = plain_read(tokens, top_indices, parent_weights, child_keys, values, P, C, 1.3)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, expected, **tolerance)
    upstream = torch.randn_like(out)
    for grad, expected_grad in zip(torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(expected, inputs, upstream)):
        torch.testing.assert_close(grad, expected_grad, **tolerance)
    assert bool(grouped_calls) == (way == "parent by parent")


@pytest.mark.parametrize("sparse_gradients", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_memory_read_parent_by_parent_matches_token_by_token(sparse_gradients, dtype, monkeypatch):
    torch.manual_seed(0)
    memory = SparseHierarchicalMemory(16, 16, 4, 3, 1.4, "normal", "sparse", parent_keys="product").to(dtype)
    memory.sparse_gradients = sparse_gradients
    hidden = torch.randn(30, 16, dtype=dtype)

    def read():  # the output and the gradients of every parameter
        out = memory(hidden)
        grads = torch.autograd.grad(out.float().square().sum(), list(memory.parameters()))
        return [out] + [grad.to_dense() for grad in grads]

    expected = read()
    monkeypatch.setattr("spartan.memory.GROUPED_MIN_TABLE_BYTES", 0)
    monkeypatch.setattr("spartan.memory.GROUPED_MIN_PAIRS_PER_PARENT", 1)
    grouped_calls = []
    grouped_mm = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: grouped_calls.append(1) or grouped_mm(*a, **k))
    got = read()
    assert grouped_calls
    # token by token, bfloat16 tables are read through float32 copies; parent by parent, in bfloat16
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for value, expected_value in zip(got, expected):
        assert value.dtype == dtype
        torch.testing.assert_close(value.float(), expected_value.float(), **tolerance)


@pytest.mark.parametrize("parent_keys", ["flat", "product"])
def test_sparse_read_under_bf16_autocast_is_close_to_fp32_with_gradients(parent_keys):
    torch.manual_seed(0)
    memory = SparseHierarchicalMemory(32, 16, 3, 4, 1.4, "normal", "sparse", parent_keys=parent_keys)
    hidden = torch.randn(4, 6, 32, requires_grad=True)
    params = [hidden, *memory.parameters()]
    expected = torch.autograd.grad(memory(hidden).square().sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = memory(hidden.bfloat16())
    grads = torch.autograd.grad(out.float().square().sum(), params)
    for grad, expected_grad in zip(grads, expected):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected_grad, atol=0.1, rtol=0.1)


def test_sparse_gradients_are_refused_where_the_read_gives_dense_ones():
    flat = SparseHierarchicalMemory(16, 8, 3, 4, implementation="sparse")
    with pytest.raises(ValueError, match="sparse_gradients needs parent_keys='product'"):
        flat.sparse_gradients = True
    dense = SparseHierarchicalMemory(16, 16, 3, 4, implementation="dense", parent_keys="product")
    with pytest.raises(ValueError, match="implementation='sparse'"):
        dense.sparse_gradients = True
    assert not flat.sparse_gradients and not dense.sparse_gradients


def test_sparse_read_of_no_tokens_has_zero_gradients():
    memory = SparseHierarchicalMemory(16, 8, 3, 4, value_init="normal", implementation="sparse")
    hidden = torch.randn(0, 16, requires_grad=True)
    memory(hidden).sum().backward()
    assert hidden.grad.shape == (0, 16)
    assert all(p.grad is None or not p.grad.any() for p in memory.parameters())


def test_sparse_read_with_every_parent_selected_matches_dense():
    dense, sparse = make_pair(parents=5, top_k=5)
    hidden = torch.randn(6, 24, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(sparse(hidden), dense(hidden))
    params = [hidden, *sparse.parameters()]
    grads = torch.autograd.grad(sparse(hidden).square().sum(), params)
    expected = torch.autograd.grad(dense(hidden).square().sum(), [hidden, *dense.parameters()])
    for grad, expected_grad in zip(grads, expected):
        torch.testing.assert_close(grad, expected_grad)
