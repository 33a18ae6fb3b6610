"""Perplexity over non-overlapping token windows, as the shared benchmark protocol defines it.

For each window of ``seq_len`` tokens the model predicts tokens ``1..seq_len-1`` from their prefixes;
the window's loss is the mean next-token cross-entropy over those ``seq_len - 1`` predictions (the
same number Hugging Face's ``model(input_ids, labels=input_ids).loss`` gives). The reported
perplexity is ``exp(mean over windows of the window loss)``. Window losses are accumulated in float64
so the result does not depend on the order or number of windows beyond rounding of each window.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import test_text, token_windows, tokenize_text


def _model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless module."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _logits_of(output: Any) -> torch.Tensor:
    """Pull the logits out of whatever the model returned (HF output object, tuple or tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"Cannot find logits in the model output of type {type(output).__name__}")
    return logits


def window_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of one ``[1, seq_len]`` window, as a Python float.

    Logits are upcast to float32 (bf16/fp16 models) before the log-softmax.
    """
    logits = _logits_of(model(input_ids))
    shift_logits = logits[:, :-1, :].float()
    shift_labels = input_ids[:, 1:].to(shift_logits.device)
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1))
    return float(loss.double().item())


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any | None,
    text_or_tokens: str | torch.Tensor,
    seq_len: int = 512,
    max_windows: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on non-overlapping ``seq_len``-token windows.

    Args:
        model: a causal LM; called as ``model(input_ids)`` and expected to return logits of shape
            ``[1, seq_len, vocab]`` (a tensor, or an object/tuple carrying them as ``.logits``/first item).
        tokenizer: used only when ``text_or_tokens`` is a string (tokenized once, no BOS); may be
            ``None`` for token input.
        text_or_tokens: the text, or a token tensor of any shape (flattened to one stream; a
            ``[num, seq_len]`` window tensor therefore gives back exactly those windows).
        seq_len: tokens per window.
        max_windows: use at most the first this many windows; ``None`` uses every full window (a
            trailing partial window is dropped).
        device: where to run; ``None`` means the model's own device. Inputs are moved there, the
            model is not.
        progress: show a tqdm progress bar over the windows.

    Returns:
        ``exp(mean_w loss_w)`` where ``loss_w`` is the mean token cross-entropy of window ``w``.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to have a next token to predict, got {seq_len}")
    if isinstance(text_or_tokens, str):
        if tokenizer is None:
            raise ValueError("A tokenizer is needed to compute perplexity on text")
        tokens = tokenize_text(tokenizer, text_or_tokens)
    else:
        tokens = torch.as_tensor(text_or_tokens).reshape(-1).long()
    num_windows = tokens.numel() // seq_len
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    if num_windows <= 0:
        raise ValueError(f"Only {tokens.numel()} tokens: not enough for one window of {seq_len}")
    windows = tokens[: num_windows * seq_len].reshape(num_windows, seq_len)

    run_device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total = 0.0  # Python float: float64 accumulation of the per-window losses
    try:
        with torch.no_grad():
            bar = tqdm(range(num_windows), desc="perplexity", unit="window", disable=not progress)
            for i in bar:
                total += window_loss(model, windows[i : i + 1].to(run_device))
                if progress:
                    bar.set_postfix(ppl=f"{math.exp(total / (i + 1)):.3f}")
    finally:
        model.train(was_training)
    return math.exp(total / num_windows)


def evaluate_shared_protocol(
    model: torch.nn.Module,
    tokenizer: Any,
    num_windows: int = 40,
    seq_len: int = 512,
    progress: bool = True,
) -> float:
    """The shared benchmark number: perplexity on the first ``num_windows`` windows of wiki.test.raw.

    Unlike :func:`perplexity`, it fails if the test text is too short for ``num_windows`` windows, so
    a reported number always covers the full protocol.
    """
    windows = token_windows(tokenizer, test_text(), seq_len, num_windows)
    return perplexity(model, None, windows, seq_len=seq_len, progress=progress)
