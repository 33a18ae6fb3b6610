"""The quantizer's check that a model-level transform (rotation) kept the float model's function."""

import logging

import pytest
import torch
import torch.nn as nn

from quark.torch.algorithm import float_check
from quark.torch.algorithm.float_check import (
    PROBE_TOKENS,
    check_unchanged,
    float_logits,
    probe_batch,
    tolerances,
)


def test_probe_batch_slices_text_batches_and_leaves_the_others():
    ids = torch.arange(3 * 100).reshape(3, 100)
    mask = torch.ones(3, 100, dtype=torch.long)
    sliced = probe_batch({"input_ids": ids, "attention_mask": mask, "use_cache": False})
    assert torch.equal(sliced["input_ids"], ids[:1, :PROBE_TOKENS]) and sliced["attention_mask"].shape == (1, 32)
    assert sliced["use_cache"] is False
    assert torch.equal(probe_batch(ids), ids[:1, :PROBE_TOKENS])
    assert torch.equal(probe_batch([ids])[0], ids[:1, :PROBE_TOKENS])
    images = {"input_ids": ids, "pixel_values": torch.zeros(3, 3, 8, 8)}
    assert probe_batch(images) is images  # not sliceable along the tokens: unchanged


def test_half_precision_warns_before_it_refuses(caplog):
    before = torch.ones(1, 4, 10)
    assert tolerances(nn.Linear(2, 2)) == (1e-3, 1e-3)
    assert tolerances(nn.Linear(2, 2).to(torch.bfloat16)) == (5e-2, 0.3)
    with caplog.at_level(logging.WARNING):
        diff = check_unchanged(before, before * 1.1, (5e-2, 0.3), "rotation")
    assert diff == pytest.approx(0.1, rel=1e-5) and "half-precision rounding" in caplog.text
    with pytest.raises(ValueError, match=r"rotation changed the float model's function: .* moved by 0.5 "
                                         r"\(relative; at most 0.3 expected\)"):
        check_unchanged(before, before * 1.5, (5e-2, 0.3), "rotation")
    with pytest.raises(ValueError, match="moved by nan"):
        check_unchanged(before, before * float("nan"), (1e-3, 1e-3), "rotation")
    assert check_unchanged(None, before, (1e-3, 1e-3), "rotation") is None


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.broken = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.broken:
            raise RuntimeError("shape mismatch")
        return self.emb(input_ids)


def test_a_forward_that_fails_only_after_the_transform_is_an_error():
    model, ids = _Toy(), torch.zeros(2, 40, dtype=torch.long)
    logits = float_logits(model, ids)
    assert logits.shape == (1, PROBE_TOKENS, 4) and logits.device.type == "cpu"  # the last positions of row 0
    model.broken = True
    assert float_logits(model, ids) is None  # before the transform: the check is skipped
    with pytest.raises(RuntimeError, match="ran before the transform and fails after it: shape mismatch"):
        float_logits(model, ids, required=True)


def test_probe_module_is_what_the_quantizer_uses():
    import inspect

    from quark.torch.quantization import api

    source = inspect.getsource(api.ModelQuantizer._calibrate_blocks)
    assert "float_check.float_logits(model, probe, required=True)" in source and float_check.tolerances
