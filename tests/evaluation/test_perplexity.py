"""Perplexity and token windows, on tiny models built in the test (no download, no real data)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quark.torch.evaluation import perplexity, token_windows, tokenize_text
from quark.torch.evaluation.perplexity import window_loss

VOCAB = 128


class ListTokenizer:
    """A stand-in tokenizer: whitespace-separated integers are token ids; BOS would be id 0."""

    bos_token_id = 0

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        self.calls.append({"text": text, "add_special_tokens": add_special_tokens})
        ids = [int(t) for t in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


class OracleLM(nn.Module):
    """Knows the stream follows ``next = (cur + 1) % vocab`` and bets everything on it."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*input_ids.shape, self.vocab), -1e4, device=input_ids.device)
        return logits.scatter(-1, ((input_ids + 1) % self.vocab).unsqueeze(-1), 1e4) + self.anchor


class UniformLM(nn.Module):
    """Equal logits for every token: perplexity must be the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.vocab)


@pytest.fixture(scope="module")
def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random init is near-uniform; sharpen it so the number is not trivially ~VOCAB
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return model.eval()


def _hand_perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean over windows of mean next-token NLL), all in float64, one window at a time."""
    losses = []
    with torch.no_grad():
        for w in windows:
            logits = model(w.unsqueeze(0)).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            nll = -logp.gather(-1, w[1:].unsqueeze(-1)).squeeze(-1)
            losses.append(nll.mean().item())
    return math.exp(sum(losses) / len(losses))


def test_tiny_llama_matches_float64_hand_computation(tiny_llama: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    stream = torch.randint(0, VOCAB, (5 * 64 + 17,), generator=g)  # trailing partial window dropped
    windows = stream[: 5 * 64].reshape(5, 64)
    expected = _hand_perplexity(tiny_llama, windows)
    got = perplexity(tiny_llama, None, stream, seq_len=64, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    assert 1.5 < got < VOCAB * 4  # a real, non-degenerate number
    # max_windows takes the *first* windows
    first3 = perplexity(tiny_llama, None, stream, seq_len=64, max_windows=3, progress=False)
    assert first3 == pytest.approx(_hand_perplexity(tiny_llama, windows[:3]), rel=1e-5)


def test_text_input_matches_token_input(tiny_llama: nn.Module) -> None:
    tok = ListTokenizer()
    ids = torch.arange(200) * 7 % VOCAB
    text = " ".join(str(int(i)) for i in ids)
    from_text = perplexity(tiny_llama, tok, text, seq_len=50, progress=False)
    from_ids = perplexity(tiny_llama, None, ids, seq_len=50, progress=False)
    assert from_text == from_ids
    assert tok.calls == [{"text": text, "add_special_tokens": False}]  # one call, no BOS


def test_window_loss_is_hf_loss(tiny_llama: nn.Module) -> None:
    x = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf = tiny_llama(x, labels=x).loss.item()
        assert window_loss(tiny_llama, x) == pytest.approx(hf, rel=1e-6)


def test_model_mode_is_restored_and_no_grad(tiny_llama: nn.Module) -> None:
    tiny_llama.train()
    try:
        perplexity(tiny_llama, None, torch.arange(64) % VOCAB, seq_len=32, progress=False)
        assert tiny_llama.training
        assert all(p.grad is None for p in tiny_llama.parameters())
    finally:
        tiny_llama.eval()


def test_oracle_model_has_perplexity_one() -> None:
    stream = torch.arange(1000) % VOCAB
    assert perplexity(OracleLM(VOCAB), None, stream, seq_len=100, progress=False) == pytest.approx(1.0, abs=1e-9)


def test_uniform_model_has_perplexity_vocab_size() -> None:
    stream = torch.randint(0, VOCAB, (512,), generator=torch.Generator().manual_seed(3))
    assert perplexity(UniformLM(VOCAB), None, stream, seq_len=128, progress=True) == pytest.approx(VOCAB, rel=1e-6)


def test_token_windows_are_consecutive_non_overlapping_slices() -> None:
    tok = ListTokenizer()
    ids = list(range(1000, 1000 + 103))
    text = " ".join(map(str, ids))
    w = token_windows(tok, text, seq_len=10, num_windows=7)
    assert w.shape == (7, 10) and w.dtype == torch.long
    assert w.reshape(-1).tolist() == ids[:70]  # exactly the first 7*10 tokens, in order, no overlap
    for i in range(7):
        assert w[i].tolist() == ids[10 * i : 10 * (i + 1)]
    assert len(tok.calls) == 1 and tok.calls[0]["add_special_tokens"] is False
    assert tokenize_text(tok, text).tolist() == ids  # no BOS


def test_token_windows_too_short_text_is_an_error() -> None:
    with pytest.raises(ValueError, match="fewer than the 40 needed"):
        token_windows(ListTokenizer(), " ".join(["5"] * 39), seq_len=10, num_windows=4)
    with pytest.raises(ValueError, match="positive"):
        token_windows(ListTokenizer(), "1 2 3", seq_len=0, num_windows=1)


def test_perplexity_input_errors() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(UniformLM(VOCAB), None, "1 2 3", seq_len=2, progress=False)
    with pytest.raises(ValueError, match="not enough"):
        perplexity(UniformLM(VOCAB), None, torch.arange(10), seq_len=64, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an accelerator")
def test_inputs_follow_the_model_device() -> None:
    model = OracleLM(VOCAB).to("cuda")
    assert perplexity(model, None, torch.arange(300) % VOCAB, seq_len=100, progress=False) == pytest.approx(1.0)
