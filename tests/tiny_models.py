"""Tiny randomly initialised Hugging Face models, built locally (no downloads)."""

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

VOCAB = 99
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=VOCAB)
DECODER = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

ARCHITECTURES = {
    "bert": lambda: BertForSequenceClassification(BertConfig(**ENCODER)),
    "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(**ENCODER, pad_token_id=1)),
    "distilbert": lambda: DistilBertForSequenceClassification(
        DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=48, vocab_size=VOCAB)
    ),
    "electra": lambda: ElectraForSequenceClassification(ElectraConfig(**ENCODER, embedding_size=16)),
    "xlm-roberta": lambda: XLMRobertaForSequenceClassification(XLMRobertaConfig(**ENCODER, pad_token_id=1)),
    "deberta-v2": lambda: DebertaV2ForSequenceClassification(DebertaV2Config(**ENCODER)),
    "gpt2": lambda: GPT2ForSequenceClassification(
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, **DECODER)
    ),
    "llama": lambda: LlamaForSequenceClassification(LlamaConfig(**ENCODER, num_key_value_heads=1, **DECODER)),
}


def tiny(architecture: str, seed: int = 0) -> torch.nn.Module:
    """A two-label sequence classifier of the given architecture, in eval mode."""
    torch.manual_seed(seed)
    return ARCHITECTURES[architecture]().eval()


def tiny_bert_without_dropout(seed: int = 0) -> torch.nn.Module:
    """A tiny BERT classifier that trains deterministically (transformers 4.x keeps the attention
    dropout as a float, out of reach of ``nn.Dropout`` modules, so it is switched off in the config)."""
    torch.manual_seed(seed)
    config = BertConfig(**ENCODER, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def tiny_llama_lm(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**ENCODER, num_key_value_heads=1, **DECODER)).eval()


def batch(batch_size: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids (avoiding special ids 0-2) with a padded last row, and labels."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[-1, length - 2 :] = 0
    input_ids[-1, length - 2 :] = 0
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def save_tiny_bert_for_fixtures(folder, fixtures) -> str:
    """Save into ``folder`` a tiny BERT encoder (no task head: loading it makes a new, random one) and a
    word-piece tokenizer whose vocabulary is every word and punctuation mark of the GLUE fixtures."""
    import re
    from pathlib import Path

    from transformers import BertModel, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = set()
    for path in Path(fixtures).rglob("*.tsv"):
        words.update(re.findall(r"\w+|[^\w\s]", path.read_text(encoding="utf-8-sig").lower()))
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)
