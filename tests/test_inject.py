"""wrap_model / unwrap_model on tiny models of many architectures."""

import pytest
import torch
from tests.tiny_models import ARCHITECTURES, batch, tiny, tiny_bert_without_dropout, tiny_llama_lm

import spartan


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_wrap_train_unwrap(architecture):
    model = tiny(architecture)
    inputs = batch()
    base_logits = model(**inputs).logits
    backbone = {name: p.detach().clone() for name, p in model.named_parameters()}

    assert spartan.wrap_model(model, num_parents=4, children_per_parent=2, top_k=2) is model
    assert len(spartan.get_memories(model)) == 2
    assert torch.equal(model(**inputs).logits, base_logits)  # zero-initialised values read nothing

    head_params = {f"{path}." for path in spartan.get_task_module_paths(model)}
    for name, param in model.named_parameters():
        expected = name.startswith("spartan_memories.") or any(name.startswith(h) for h in head_params)
        assert param.requires_grad == expected, name

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()
    model.eval()
    for name, param in model.named_parameters():
        if name in backbone and not any(name.startswith(h) for h in head_params):
            assert torch.equal(param, backbone[name]), f"frozen {name} changed"
    assert not torch.equal(model(**inputs).logits, base_logits)

    spartan.unwrap_model(model)
    assert not hasattr(model, "spartan_memories")
    assert torch.equal(model(**inputs).logits, base_logits)
    assert all(p.requires_grad for p in model.parameters())


def test_memory_read_is_added_to_each_layer_output():
    model = tiny("bert")
    spartan.wrap_model(model, value_init="normal")
    seen = {}
    memory = spartan.get_memories(model)[0]
    memory.register_forward_pre_hook(lambda module, args: seen.update(read_input=args[0]))
    layer = model.bert.encoder.layer[0]  # returns a tuple in transformers 4.x, a tensor in 5.x
    layer.register_forward_hook(lambda module, args, output: seen.update(layer_output=output))
    model(**batch())
    if isinstance(seen["layer_output"], tuple):
        seen["layer_output"] = seen["layer_output"][0]
    read = memory(seen["read_input"])
    assert torch.count_nonzero(read) > 0
    torch.testing.assert_close(seen["layer_output"], seen["read_input"] + read)


def test_auxiliary_loss_is_added_in_training_only_and_ignores_padding():
    model = tiny_bert_without_dropout()
    inputs = batch()
    spartan.wrap_model(model, aux_loss_weight=0.5, value_init="normal")
    model.eval()
    eval_loss = model(**inputs).loss
    model.train()
    outputs = model(**inputs)
    aux = spartan.auxiliary_loss(model)
    torch.testing.assert_close(outputs.loss, eval_loss + aux)
    assert outputs["loss"] is outputs.loss

    # padding tokens are left out: changing what padded positions route to does not change the loss
    padded = dict(inputs)
    padded["input_ids"] = inputs["input_ids"].clone()
    padded["input_ids"][-1, -2:] = 50
    model(**padded)
    torch.testing.assert_close(spartan.auxiliary_loss(model), aux)

    tuple_outputs = model(**inputs, return_dict=False)
    torch.testing.assert_close(tuple_outputs[0], eval_loss + aux)


def test_decoder_language_model_gets_memories_and_no_head():
    model = tiny_llama_lm()
    spartan.wrap_model(model)
    norms = [f"model.layers.{i}.{name}" for i in range(2) for name in ("input_layernorm", "post_attention_layernorm")]
    assert spartan.get_task_module_paths(model) == norms  # the trained norms, and no head
    stats = spartan.trainable_parameters(model)
    assert stats["trainable_params"] == 2 * (16 * 32 + 2 * 16 * 3 * 32) + 4 * 32  # RMSNorms: a weight each
    ids = batch()["input_ids"]
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert model.spartan_memories["default"][0].values.grad is not None


def test_layers_and_modules_to_save_overrides():
    model = tiny("bert")
    spartan.wrap_model(model, layers="bert.encoder.layer", modules_to_save=["classifier", "bert.pooler"])
    assert spartan.get_layer_paths(model) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert model.bert.pooler.dense.weight.requires_grad


def test_errors_are_actionable():
    model = tiny("bert")
    with pytest.raises(ValueError, match="layers="):
        spartan.wrap_model(model, layers="bert.decoder")
    with pytest.raises(ValueError, match="layers="):
        spartan.wrap_model(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="top_k"):
        spartan.wrap_model(model, top_k=99)
    with pytest.raises(ValueError, match="unknown SpartanConfig field"):
        spartan.wrap_model(model, num_parent=3)
    with pytest.raises(ValueError, match="modules_to_save"):
        spartan.wrap_model(model, modules_to_save=["head"])
    spartan.wrap_model(model)
    with pytest.raises(ValueError, match="already wrapped"):
        spartan.wrap_model(model)
    with pytest.raises(ValueError, match="not wrapped"):
        spartan.unwrap_model(tiny("bert"))


def test_parameter_report(capsys):
    model = tiny("bert")
    total = sum(p.numel() for p in model.parameters())
    spartan.wrap_model(model)  # 16 parents x 3 children at hidden 32, two layers
    memory_params = 2 * (16 * 32 + 2 * 16 * 3 * 32)
    task_params = memory_params + 32 * 2 + 2 + 2 * 2 * (32 + 32)  # + head + two LayerNorms per layer
    stats = spartan.trainable_parameters(model)
    assert stats["trainable_params"] == task_params
    assert stats["total_params"] == total + memory_params
    assert stats["checkpoint_bytes"] == 4 * task_params
    spartan.print_trainable_parameters(model)
    printed = capsys.readouterr().out
    assert f"{task_params:,}" in printed and "KiB" in printed


def test_config_json_round_trip(tmp_path):
    config = spartan.SpartanConfig(num_parents=8, top_k=3, layers="bert.encoder.layer")
    config.save(tmp_path / "config.json")
    assert spartan.SpartanConfig.load(tmp_path / "config.json") == config
    assert config.layers == ["bert.encoder.layer"]
    with pytest.raises(ValueError, match="implementation"):
        spartan.SpartanConfig(implementation="fast")


@pytest.mark.parametrize("architecture, norms_per_layer", [("bert", 2), ("distilbert", 2), ("gpt2", 2), ("llama", 2)])
def test_train_layer_norms_trains_each_wrapped_layers_norms(architecture, norms_per_layer):
    model = spartan.wrap_model(
        tiny(architecture), num_parents=4, children_per_parent=2, top_k=2, train_layer_norms=True
    )
    layers = spartan.get_layer_paths(model)
    norms = [path for path in spartan.get_task_module_paths(model) if path.startswith(tuple(layers))]
    assert len(norms) == norms_per_layer * len(layers)
    assert spartan.find_layer_norms(tiny(architecture)) == norms  # the same paths, without wrapping
    for path in norms:
        assert all(p.requires_grad for p in model.get_submodule(path).parameters()), path
    assert any(key.startswith(f"modules.{norms[0]}.") for key in spartan.task_state_dict(model))
    with pytest.raises(ValueError, match="train_layer_norms"):
        spartan.add_memory(model, "other", train_layer_norms=False)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(aux_loss_weight=float("nan")), "aux_loss_weight"),
        (dict(aux_loss_weight=float("inf")), "aux_loss_weight"),
        (dict(train_layer_norms="no"), "train_layer_norms"),
        (dict(layers=123), "layers"),
        (dict(temperature=True), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_k="eight"), "top_k"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field) as error:
        spartan.SpartanConfig(**overrides)
    assert "\n" not in str(error.value)


def test_config_takes_numpy_and_string_numbers():
    import numpy as np

    config = spartan.SpartanConfig(num_parents=np.int64(16), top_k="4", temperature="1.6", aux_loss_weight="1e-2")
    assert (config.num_parents, config.top_k, config.temperature, config.aux_loss_weight) == (16, 4, 1.6, 0.01)
    assert type(config.num_parents) is int
    assert config.memory_parameters(32) == 16 * 32 + 2 * 16 * 3 * 32


def test_every_stack_of_an_encoder_decoder_is_wrapped():
    from transformers import BartConfig, BartForSequenceClassification

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
    )
    model = BartForSequenceClassification(config).eval()
    ids = torch.randint(3, 99, (2, 6))
    ids[:, -1] = config.eos_token_id
    base = model(input_ids=ids).logits
    spartan.wrap_model(model, num_parents=4, children_per_parent=2, top_k=2)
    assert spartan.get_layer_paths(model) == [
        "model.encoder.layers.0", "model.encoder.layers.1", "model.decoder.layers.0", "model.decoder.layers.1",
    ]
    assert torch.equal(model(input_ids=ids).logits, base)


def test_shared_layers_are_stated():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(
        vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=48,
    )
    with pytest.warns(UserWarning, match="shared by every application"):
        spartan.wrap_model(AlbertForSequenceClassification(config), num_parents=4, top_k=2)


def test_trainer_loss_kwargs_keep_the_load_balancing_weight_relative_to_the_task_loss():
    # Sequence labels: the model's loss stays a per-micro-batch mean, so the load-balancing loss is not scaled.
    model = tiny_bert_without_dropout()
    inputs = batch()
    spartan.wrap_model(model, aux_loss_weight=0.5, value_init="normal")
    model.train()
    whole = model(**inputs).loss
    aux = spartan.auxiliary_loss(model)
    torch.testing.assert_close(model(**inputs, num_items_in_batch=torch.tensor(6)).loss, whole)
    # Token labels of a causal LM: the task loss is divided by the items of the whole accumulation.
    lm = spartan.wrap_model(tiny_llama_lm(), aux_loss_weight=0.5, value_init="normal")
    lm.train()
    ids = batch()["input_ids"]
    items = ids[:, 1:].numel()
    task_and_aux = lm(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(items)).loss
    aux = spartan.auxiliary_loss(lm)
    half = lm(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(2 * items)).loss
    torch.testing.assert_close(half, (task_and_aux - aux) / 2 + aux / 2, rtol=1e-5, atol=1e-6)


def test_a_failed_wrap_leaves_the_model_as_it_was():
    model = tiny("bert")
    flags = [p.requires_grad for p in model.parameters()]
    for bad in (dict(problem_type="bogus"), dict(num_labels=0), dict(id2label=["a", "b"])):
        with pytest.raises(ValueError, match="problem_type|num_labels|id2label"):
            spartan.wrap_model(model, **bad)
        assert not spartan.is_wrapped(model)
        assert [p.requires_grad for p in model.parameters()] == flags


def test_encoder_decoder_classification_heads_are_found():
    from transformers import BartConfig, BartForSequenceClassification

    config = BartConfig(
        vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
    )
    model = spartan.wrap_model(BartForSequenceClassification(config), num_parents=4, top_k=2, train_layer_norms=False)
    assert spartan.get_task_module_paths(model) == ["classification_head"]
    assert all(p.requires_grad for p in model.classification_head.parameters())


def test_parameter_report_names_the_wrapped_layers(capsys):
    model = spartan.wrap_model(tiny("bert"))
    spartan.print_trainable_parameters(model)
    assert "memories after 2 layers (bert.encoder.layer.0-1)" in capsys.readouterr().out
