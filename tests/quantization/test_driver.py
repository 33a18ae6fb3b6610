"""The per-block driver replays exactly what the model computes."""

import pytest
import torch
import torch.nn as nn

from quark.torch.quantization.driver import capture_block_inputs, find_decoder_layers, for_each_block
from tests.helpers import tiny_llama, token_batches


def test_find_decoder_layers_auto_and_by_path():
    model = tiny_llama(layers=3)
    name, layers = find_decoder_layers(model)
    assert name == "model.layers" and len(layers) == 3
    assert find_decoder_layers(model, "model.layers")[1] is layers


def test_block_loop_reproduces_the_model_hidden_states():
    model = tiny_llama(layers=3)
    batches = token_batches(3)
    _, layers = find_decoder_layers(model)
    inputs = capture_block_inputs(model, layers, batches, progress=False)
    assert len(inputs) == 3 and inputs.hidden[0].shape == (1, 16, 64)
    seen = []
    out = for_each_block(layers, inputs, lambda i, block, inp: seen.append(i), progress=False)
    assert seen == [0, 1, 2]
    with torch.no_grad():
        for batch, h in zip(batches, out):
            ref = model.model(**batch, output_hidden_states=True).hidden_states[-1]
            # hidden_states[-1] is after the final norm in some versions: compare pre-norm via norm(h)
            torch.testing.assert_close(model.model.norm(h), model.model(**batch).last_hidden_state, rtol=0, atol=1e-5)
            assert ref.shape == h.shape
    # the blocks' forward is restored after capture
    assert "forward" not in layers[0].__dict__


def test_the_block_loop_asks_the_trimmer_after_every_block(monkeypatch):
    import quark.torch.utils.memory as memory

    calls = []
    monkeypatch.setattr(memory.BlockTrimmer, "after_block", lambda self: calls.append(len(calls)) or False)
    model = tiny_llama(layers=3)
    _, layers = find_decoder_layers(model)
    inputs = capture_block_inputs(model, layers, token_batches(2), progress=False)
    order = []
    for_each_block(layers, inputs, lambda i, block, inp: order.append(("block", i, len(calls))), progress=False)
    assert order == [("block", 0, 0), ("block", 1, 1), ("block", 2, 2)] and len(calls) == 3


def test_trimmer_trims_only_when_the_resident_size_crept_past_the_slack(monkeypatch):
    """The level is the resident size after the first block since the last trim; a trim comes once
    a later block ends more than the slack above it, and the next block sets a new level."""
    import quark.torch.utils.memory as memory

    mb = 1 << 20
    sizes = iter([900, 950, 960, 965, 700, 760, 770, 771])  # MB after each block
    trims = []
    monkeypatch.setattr(memory, "resident_bytes", lambda: next(sizes) * mb)
    monkeypatch.setattr(memory, "release_free_memory", lambda: trims.append(1) or True)
    trimmer = memory.BlockTrimmer(slack=64 * mb)
    done = [trimmer.after_block() for _ in range(8)]
    # 900: level; 950, 960 within 64 MB; 965 > 964: trim; 700: new level; 760 within; 770, 771 over
    assert done == [False, False, False, True, False, False, True, False] and len(trims) == trimmer.trims == 2


def test_trimmer_trims_every_block_without_a_resident_size(monkeypatch):
    import quark.torch.utils.memory as memory

    trims = []
    monkeypatch.setattr(memory, "resident_bytes", lambda: None)
    monkeypatch.setattr(memory, "release_free_memory", lambda: trims.append(1) or True)
    trimmer = memory.BlockTrimmer()
    assert [trimmer.after_block() for _ in range(3)] == [True, True, True] and len(trims) == 3


def test_resident_bytes_reads_this_process():
    """The resident size from /proc/self/statm agrees with VmRSS of /proc/self/status (another
    reading of the same counter, in kB)."""
    import sys
    from pathlib import Path

    from quark.torch.utils.memory import resident_bytes

    rss = resident_bytes()
    if not sys.platform.startswith("linux"):
        assert rss is None or rss > 0
        return
    status = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    vm_rss = int(status.split()[1]) * 1024
    assert 10 << 20 < rss < 1 << 40
    assert abs(rss - vm_rss) < 8 << 20  # read a moment apart


def test_release_free_memory_works_on_this_platform():
    import sys

    from quark.torch.utils.memory import release_free_memory

    assert release_free_memory() is sys.platform.startswith("linux")


# -- blocks with extra outputs, blocks the model does not call, the stack guess ------------------
class _Block(nn.Module):
    """Returns ``(hidden, aux)``; the model passes ``aux`` to the next block as ``prev``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.calls = 0

    def forward(self, h: torch.Tensor, scale: torch.Tensor, prev: torch.Tensor | None = None):
        self.calls += 1
        out = self.lin(h) * scale + (0 if prev is None else prev)
        return out, out.sum(-1, keepdim=True)


class _Stack(nn.Module):
    def __init__(self, n: int = 3, skip: tuple[int, ...] = (), block: type = _Block) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([block() for _ in range(n)])
        self.skip = set(skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux = None
        for i, layer in enumerate(self.layers):
            if i in self.skip:  # like Mllama's cross-attention blocks without image states
                continue
            x, aux = layer(x, torch.tensor(0.5), prev=aux)
        return x


def _data(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, 4, 8, generator=g) for _ in range(n)]


def test_extra_outputs_of_a_block_reach_the_next_block():
    model, data = _Stack(), _data()
    inputs = capture_block_inputs(model, model.layers, data, progress=False)
    # one real call (the first block, first batch) taught the stand-ins to return (hidden, aux)
    assert [b.calls for b in model.layers] == [1, 0, 0]
    assert inputs.links == {1: {("kwarg", "prev"): 1}, 2: {("kwarg", "prev"): 1}} and inputs.skipped == []
    assert [inputs.extras[b][0][1]["prev"] for b in range(3)] == [None, None, None]
    seen = []
    out = for_each_block(model.layers, inputs, lambda i, block, inp: seen.append(i), progress=False)
    assert seen == [0, 1, 2]
    with torch.no_grad():
        for x, h in zip(data, out):
            # exact: each block got the previous block's real aux for its own batch, not the placeholder
            assert torch.equal(h, model(x))
    assert "forward" not in model.layers[0].__dict__


def test_blocks_the_model_does_not_call_are_skipped():
    model, data = _Stack(n=4, skip=(1,)), _data()
    inputs = capture_block_inputs(model, model.layers, data, progress=False)
    assert inputs.skipped == [1] and inputs.called == [0, 2, 3]
    assert all(e[1] is None for e in inputs.extras)
    assert inputs.links == {2: {("kwarg", "prev"): 1}, 3: {("kwarg", "prev"): 1}}
    seen = []
    out = for_each_block(model.layers, inputs, lambda i, block, inp: seen.append(i), progress=False)
    assert seen == [0, 2, 3] and model.layers[1].calls == 0
    with torch.no_grad():
        for x, h in zip(data, out):
            assert torch.equal(h, model(x))


def test_a_block_called_in_some_batches_only_is_an_error():
    class Sometimes(_Stack):
        def forward(self, x):
            self.skip = {1} if x.sum() > 0 else set()
            return super().forward(x)

    model = Sometimes()
    data = [torch.ones(1, 4, 8), -torch.ones(1, 4, 8)]
    with pytest.raises(ValueError, match=r"blocks \[1\] were called in some calibration batches only"):
        capture_block_inputs(model, model.layers, data, progress=False)


def test_glm_moe_dsa_top_k_indices_follow_the_block_loop():
    """GLM-MoE-DSA: block 1 ("shared" indexer) reuses block 0's top-k indices, returned next to the
    hidden states; with 4 of 16 tokens kept, a stale index set changes the result."""
    from quark.torch.testing.tiny_models import build_model

    model = build_model("glm_moe_dsa")
    assert model.config.indexer_types == ["full", "shared"] and model.config.index_topk < 16
    batches = token_batches(3)
    _, layers = find_decoder_layers(model)
    inputs = capture_block_inputs(model, layers, batches, progress=False)
    assert inputs.links == {1: {("kwarg", "prev_topk_indices"): 1}}
    out = for_each_block(layers, inputs, lambda i, block, inp: None, progress=False)
    with torch.no_grad():
        for batch, h in zip(batches, out):
            torch.testing.assert_close(model.model.norm(h), model.model(**batch).last_hidden_state, rtol=0, atol=1e-5)


def test_the_stack_guess_takes_mixed_blocks_outermost_lists_and_the_preferred_stack():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(4, 4)

    class SelfBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([Mlp() for _ in range(8)])  # nested: not a stack candidate

    class CrossBlock(SelfBlock):
        pass

    model = nn.Module()
    model.vision = nn.Module()
    model.vision.layers = nn.ModuleList([Mlp() for _ in range(4)])
    model.text = nn.Module()
    model.text.layers = nn.ModuleList([SelfBlock(), CrossBlock(), SelfBlock()])
    model.heads = nn.ModuleList([nn.Linear(4, 4) for _ in range(9)])  # bare layers: not blocks
    assert find_decoder_layers(model)[0] == "vision.layers"  # the longest
    name, layers = find_decoder_layers(model, prefer=lambda layers: isinstance(layers[0], SelfBlock))
    assert name == "text.layers" and layers is model.text.layers
    # no list preferred: the preference is ignored
    assert find_decoder_layers(model, prefer=lambda layers: False)[0] == "vision.layers"


def test_peak_resident_sees_memory_touched_inside_the_block():
    """The sampler's peak includes a buffer allocated and touched inside the ``with`` body and freed
    before it ends (caught by the thread's samples), and starts from the size at entry."""
    import sys
    import time

    from quark.torch.utils.memory import PeakResident

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/statm")
    with PeakResident(interval=0.005) as mem:
        buf = torch.ones(64 << 20, dtype=torch.float32)  # 256 MB, written
        time.sleep(0.1)
        del buf
    assert mem.start > 0 and mem.peak - mem.start >= 200 << 20
    with pytest.raises(ValueError, match="interval"):
        PeakResident(interval=0)
