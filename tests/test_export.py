"""export_onnx / OnnxRuntimeModel on tiny random models: one graph, tasks as files, mixed batches."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import spartan  # noqa: E402
from spartan.export import OnnxRuntimeModel, export_onnx  # noqa: E402
from spartan.multitask import forward_tasks  # noqa: E402
from tests.tiny_models import VOCAB, tiny  # noqa: E402


def token_batch(batch_size, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    if batch_size > 1 and length > 2:
        attention_mask[-1, -2:] = 0  # one padded row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def randomise_task(model, name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in spartan.task_state_dict(model, name).values():
            tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))


def two_task_model(architecture):
    model = spartan.wrap_model(tiny(architecture), num_parents=6, top_k=2, value_init="normal", name="pairs")
    spartan.add_memory(model, "nli", num_parents=6, top_k=2, value_init="normal", temperature=0.8, num_labels=3)
    randomise_task(model, "pairs", 0)
    randomise_task(model, "nli", 1)
    return model.eval()


def eager_logits(model, task, inputs):
    spartan.set_active_memory(model, task)
    with torch.no_grad():
        return model(**inputs).logits.numpy()


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory):
    model = two_task_model("bert")
    folder = export_onnx(model, tmp_path_factory.mktemp("deploy") / "bert", quantize="int8")
    return model, folder


@pytest.mark.parametrize("architecture", ["bert", "llama"])
def test_onnx_runtime_matches_eager_for_every_shape(architecture, tmp_path, bert_export):
    model, folder = bert_export if architecture == "bert" else (two_task_model(architecture), None)
    if folder is None:
        folder = export_onnx(model, tmp_path / architecture)
    runtime = OnnxRuntimeModel(folder, graph="fp32")
    assert runtime.tasks == ["pairs", "nli"]
    for batch_size, length in [(1, 1), (1, 128), (4, 5), (32, 128)]:
        inputs = token_batch(batch_size, length)
        for task, labels in [("pairs", 2), ("nli", 3)]:
            got = runtime(task, **{key: value.numpy() for key, value in inputs.items()})
            assert got.shape == (batch_size, labels)
            np.testing.assert_allclose(got, eager_logits(model, task, inputs), atol=1e-4, rtol=0)


def test_task_inputs_drive_the_session_directly(bert_export):
    model, folder = bert_export
    runtime = OnnxRuntimeModel(folder, graph="fp32")
    inputs = {key: value.numpy() for key, value in token_batch(2, 7).items()}
    tokens = {**inputs, "token_type_ids": np.zeros_like(inputs["input_ids"])}
    for task, labels in [("pairs", 2), ("nli", 3)]:
        fed = runtime.task_inputs(task)
        assert set(fed) == set(runtime.manifest["task_tensors"])
        assert all(array.shape[0] == 1 and not array.flags.writeable for array in fed.values())
        (logits,) = runtime.session.run(["logits"], {**tokens, **fed})
        np.testing.assert_array_equal(logits[:, :labels], runtime(task, **inputs))
    with pytest.raises(ValueError, match="no task named 'nope'"):
        runtime.task_inputs("nope")


def test_mixed_task_batches_match_eager(bert_export):
    model, folder = bert_export
    runtime = OnnxRuntimeModel(folder, graph="fp32")
    inputs = token_batch(5, 9, seed=2)
    tasks = ["nli", "pairs", "pairs", "nli", "pairs"]
    got = runtime(tasks, **{key: value.numpy() for key, value in inputs.items()})
    with torch.no_grad():
        expected = forward_tasks(model, tasks, **inputs).logits.numpy()
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.isnan(got[1, 2]) and not np.isnan(got[0]).any()


def test_the_folder_holds_one_backbone_and_small_task_files(bert_export):
    _, folder = bert_export
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tasks"]["nli"]["num_labels"] == 3 and set(manifest["graphs"]) == {"fp32", "int8"}
    graphs = sorted(p.name for p in folder.iterdir() if p.suffix == ".onnx")
    assert graphs == ["backbone.int8.onnx", "backbone.onnx"]
    assert sorted(p.name for p in (folder / "tasks").iterdir()) == ["nli", "pairs"]
    fp32, int8 = (folder / "backbone.onnx").stat().st_size, (folder / "backbone.int8.onnx").stat().st_size
    assert int8 < fp32
    import onnx

    quantized = onnx.load(str(folder / "backbone.int8.onnx"))
    assert any(init.data_type == onnx.TensorProto.UINT8 for init in quantized.graph.initializer)  # 8-bit weights
    task_inputs = {i.name for i in quantized.graph.input} & set(manifest["task_tensors"])
    assert task_inputs == set(manifest["task_tensors"])  # the memory tables stay fp32 inputs
    int8_runtime = OnnxRuntimeModel(folder)  # the default graph of a quantized export is int8
    assert int8_runtime.graph == "int8"
    inputs = {key: value.numpy() for key, value in token_batch(2, 6).items()}
    assert np.isfinite(int8_runtime("pairs", **inputs)).all()


def test_session_options_are_used_with_threads_on_top(bert_export):
    import onnxruntime

    model, folder = bert_export
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    runtime = OnnxRuntimeModel(folder, graph="fp32", threads=1, session_options=options)
    used = runtime.session.get_session_options()
    assert used.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert used.intra_op_num_threads == 1
    inputs = {key: value.numpy() for key, value in token_batch(2, 6).items()}
    expected = OnnxRuntimeModel(folder, graph="fp32")("pairs", **inputs)
    np.testing.assert_allclose(runtime("pairs", **inputs), expected, atol=1e-5)


def test_a_task_trained_after_the_export_is_added_without_re_export(bert_export, tmp_path):
    model, folder = bert_export
    import shutil

    live = tmp_path / "live"
    shutil.copytree(folder, live)
    runtime = OnnxRuntimeModel(live, graph="fp32")
    spartan.add_memory(model, "late", num_parents=6, top_k=2, value_init="normal", num_labels=1,
                       problem_type="regression")
    randomise_task(model, "late", 7)
    checkpoint = spartan.save_memory(model, tmp_path / "late", "late")
    runtime.add_task("late", checkpoint)
    inputs = token_batch(3, 6)
    np.testing.assert_allclose(
        runtime("late", **{k: v.numpy() for k, v in inputs.items()}), eager_logits(model, "late", inputs), atol=1e-4
    )
    assert "late" in OnnxRuntimeModel(live, graph="fp32").tasks  # written into the folder too
    spartan.set_active_memory(model, "pairs")
    spartan.remove_memory(model, "late")


def test_clear_errors(bert_export, tmp_path):
    model, folder = bert_export
    runtime = OnnxRuntimeModel(folder, graph="fp32")
    inputs = {key: value.numpy() for key, value in token_batch(2, 6).items()}
    with pytest.raises(ValueError, match="no task named 'nope'"):
        runtime("nope", **inputs)
    with pytest.raises(ValueError, match=r"\[batch, sequence\]"):
        runtime("pairs", input_ids=inputs["input_ids"][0])
    with pytest.raises(ValueError, match="at least one row"):
        runtime("pairs", input_ids=inputs["input_ids"][:0])
    with pytest.raises(ValueError, match="vocabulary has 99 ids"):
        runtime("pairs", input_ids=inputs["input_ids"] + 1000)
    with pytest.raises(ValueError, match="at most 512"):
        runtime("pairs", input_ids=np.ones((1, 600), dtype=np.int64))
    with pytest.raises(ValueError, match="integers"):
        runtime("pairs", input_ids=inputs["input_ids"].astype(np.float32))
    with pytest.raises(ValueError, match="one task name per row"):
        runtime(["pairs"], **inputs)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        runtime("pairs", input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"][:, :3])
    with pytest.raises(FileNotFoundError, match="not a folder written by export_onnx"):
        OnnxRuntimeModel(tmp_path)
    with pytest.raises(TypeError, match="onnxruntime.SessionOptions"):
        OnnxRuntimeModel(folder, session_options={"intra_op_num_threads": 1})
    other = spartan.wrap_model(tiny("bert", seed=3), num_parents=4, top_k=2)  # another memory shape
    with pytest.raises(ValueError, match="memories of shape"):
        runtime.add_task("other", spartan.save_memory(other, tmp_path / "other"))
    llama = spartan.wrap_model(tiny("llama"), num_parents=6, top_k=2)
    with pytest.raises(ValueError, match="another backbone"):
        runtime.add_task("llama", spartan.save_memory(llama, tmp_path / "llama"))
    corrupt = spartan.save_memory(model, tmp_path / "corrupt", "pairs")
    weights = corrupt / "spartan_memory.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ValueError, match="checksum"):
        runtime.add_task("corrupt", corrupt)
    with pytest.raises(ValueError, match="not wrapped|wrapped by spartan"):
        export_onnx(tiny("bert"), tmp_path / "bare")


def test_export_never_replaces_a_folder_it_did_not_write(tmp_path):
    model = spartan.wrap_model(tiny("bert"), num_parents=4, top_k=2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a folder written by export_onnx"):
        export_onnx(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_graph_reads_the_task_tensors_as_fed(bert_export, tmp_path):
    """No task ids, no gathers, no temperature input; each trained norm stays one LayerNormalization
    whose scale and bias are the task's inputs, also after ONNX Runtime's fusions."""
    import onnx
    import onnxruntime

    _, folder = bert_export
    task_inputs = set(json.loads((folder / "manifest.json").read_text())["task_tensors"])
    graph = onnx.load(str(folder / "backbone.onnx")).graph
    names = {value.name for value in graph.input}
    assert task_inputs <= names and "task_ids" not in names and "temperature" not in names
    assert not [node for node in graph.node if node.op_type in ("Gather", "GatherND") and node.input[0] in task_inputs]
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    onnxruntime.InferenceSession(str(folder / "backbone.onnx"), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(str(tmp_path / "optimised.onnx")).graph
    norms = {tuple(node.input[1:3]) for node in optimised.node if node.op_type == "LayerNormalization"}
    weights = sorted(name for name in task_inputs if name.endswith("LayerNorm.weight"))
    assert len(weights) == 4  # two layers, two trained norms each
    assert {(weight, weight[: -len("weight")] + "bias") for weight in weights} <= norms


def test_product_key_memories_export(tmp_path):
    settings = dict(num_parents=9, top_k=2, value_init="normal", parent_keys="product", implementation="dense")
    model = spartan.wrap_model(tiny("bert"), **settings, temperature=0.7, name="a")
    spartan.add_memory(model, "b", **settings, temperature=1.3, num_labels=3)
    randomise_task(model, "a", 0)
    randomise_task(model, "b", 1)
    model.eval()
    runtime = OnnxRuntimeModel(export_onnx(model, tmp_path / "product"))
    inputs = token_batch(3, 7)
    feeds = {key: value.numpy() for key, value in inputs.items()}
    for task in ("a", "b"):
        np.testing.assert_allclose(runtime(task, **feeds), eager_logits(model, task, inputs), atol=1e-4, rtol=0)
    with torch.no_grad():
        expected = forward_tasks(model, ["b", "a", "b"], **inputs).logits.numpy()
    np.testing.assert_allclose(runtime(["b", "a", "b"], **feeds), expected, atol=1e-4, rtol=0)


def test_old_folders_and_old_onnx_runtimes_are_refused(bert_export, tmp_path, monkeypatch):
    import shutil

    import onnxruntime

    _, folder = bert_export
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["manifest_version"] = 1  # stacked task tensors and a task_ids input
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="export again"):
        OnnxRuntimeModel(old)
    monkeypatch.setattr(onnxruntime, "__version__", "1.20.1")
    with pytest.raises(RuntimeError, match="pip install -U onnxruntime"):
        OnnxRuntimeModel(folder)
