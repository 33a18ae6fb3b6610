"""Tiny random models for tests: built from transformers config classes, no download."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 128, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **{"tie_word_embeddings": False, **overrides},
    )
    model = LlamaForCausalLM(cfg).eval()
    return model


def token_batches(n: int = 4, seq: int = 16, vocab: int = 128, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (1, seq), generator=g)} for _ in range(n)]
