"""The streamed flow's block store: decoder blocks live on disk between their turns.

:class:`DiskBlockStore` plugs into the in-memory flow's block loop (``ModelQuantizer._calibrate_blocks``
with :func:`.driver.for_each_block`): the model is a skeleton whose decoder blocks have their
parameters on ``meta``; the store loads a block from the source checkpoint onto the compute device
when its turn comes (:meth:`DiskBlockStore.enter`), hands the finished block to the output, which
writes its exported tensors, and frees it (:meth:`DiskBlockStore.leave`). It also records, before each
block, that block's complete inputs (hidden states, float-stream hidden states, linked extra inputs)
with the output, and restores them on a resumed run (:meth:`DiskBlockStore.resume_point`).

It knows no file format: ``source`` and ``output`` are given (``quark.torch.export.source_checkpoint.
SourceCheckpoint`` and ``quark.torch.export.streamed_output.StreamedOutput``; ``ModelQuantizer.
direct_quantize_checkpoint`` ties them together). What ``source`` provides: ``load(model, prefixes,
device)``. What ``output`` provides: ``write_block(index, prefix, block)``, ``save_inputs(index,
payload)`` and ``resume_inputs(model, prefixes_done) -> (index, payload) | None``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .driver import BlockInputs, BlockStore
from .fused_experts import QuantFusedExperts
from .modules import QuantLinear

__all__ = ["DiskBlockStore", "free_module"]


def free_module(module: nn.Module, keep: set[tuple[int, str]] = frozenset()) -> None:
    """Move ``module``'s parameters and buffers to ``meta`` (freeing their memory), but the buffers
    listed in ``keep`` (``(id(submodule), name)``), and drop its cached fake-quantized weights."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None and b.device.type != "meta" and (id(m), name) not in keep:
                m._buffers[name] = torch.empty_like(b, device="meta")
        if isinstance(m, QuantLinear):
            m._wq_cache = None
        elif isinstance(m, QuantFusedExperts):
            m.drop_weight_caches()


class DiskBlockStore(BlockStore):
    """Blocks are read from ``source`` for their turn and written to ``output`` once done."""

    loads_blocks = True

    def __init__(self, source: Any, output: Any, model: nn.Module, path: str, device: torch.device,
                 deferred: list[str] = ()) -> None:
        super().__init__(device)
        self.source, self.output, self.model, self.path = source, output, model, path
        #: modules outside the stack needed only after it (the output head): loaded in blocks_done
        self.deferred = list(deferred)
        # buffers the model computed in __init__ (not in the checkpoint): kept when a block is freed
        self._init_buffers = {(id(m), n) for m in model.get_submodule(path).modules()
                              for n, b in m._buffers.items() if b is not None and b.device.type != "meta"}

    def prefix(self, index: int) -> str:
        return f"{self.path}.{index}"

    def enter(self, index: int, block: nn.Module) -> None:
        self.source.load(self.model, [self.prefix(index)], self.device)
        for m in block.modules():
            if isinstance(m, QuantFusedExperts):  # as the in-memory flow wraps them: weight qparams first
                m.update_weight_qparams()
        for prepare in self.block_preparers:  # then the algorithms' model preparation (rotation)
            prepare(index, block)

    def leave(self, index: int, block: nn.Module, done: bool) -> None:
        if done:
            for m in block.modules():
                if isinstance(m, QuantFusedExperts):
                    m.update_weight_qparams()  # what the in-memory flow does after its loop (a no-op there)
            self.output.write_block(index, self.prefix(index), block)
        free_module(block, self._init_buffers)

    def blocks_done(self) -> None:
        if self.deferred:
            self.source.load(self.model, self.deferred, self.device)

    def after_block(self, index: int, next_index: int, inputs: BlockInputs) -> None:
        links = inputs.links.get(next_index, {})
        linked = [{f"{kind}:{key}": inputs.extras[b][next_index][0 if kind == "arg" else 1][key]
                   for (kind, key) in links} for b in range(len(inputs))]
        self.output.save_inputs(next_index, {"hidden": list(inputs.hidden), "float_hidden": self.float_hidden(),
                                             "linked": linked})

    def resume_point(self, inputs: BlockInputs) -> tuple[int, list[torch.Tensor] | None] | None:
        found = self.output.resume_inputs(self.model, lambda nxt: [
            self.prefix(i) for i in sorted({*inputs.called, *inputs.skipped}) if i < nxt])
        if found is None:
            return None
        nxt, saved = found
        if len(saved["hidden"]) != len(inputs):
            return None
        inputs.hidden = [inputs.keep(h) if inputs.spill is not None else h.to(self.device) for h in saved["hidden"]]
        for b, values in enumerate(saved["linked"]):
            if not values:
                continue
            args, kwargs = inputs.extras[b][nxt]
            args, kwargs = list(args), dict(kwargs)
            for loc, value in values.items():
                kind, _, key = loc.partition(":")
                if kind == "arg":
                    args[int(key)] = value
                else:
                    kwargs[key] = value
            inputs.extras[b][nxt] = (tuple(args), kwargs)
        float_hidden = saved["float_hidden"]
        if float_hidden is not None:
            float_hidden = [inputs.keep(h) if inputs.spill is not None else h.to(self.device) for h in float_hidden]
        return nxt, float_hidden
