"""Record the calls a model makes to some of its modules, to measure those modules on their real inputs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn


def record_calls(model: nn.Module, modules: Iterable[nn.Module], batches: Iterable[dict[str, Any]]
                 ) -> list[tuple[nn.Module, tuple, dict]]:
    """``(module, args, kwargs)`` of every call ``model`` makes to one of ``modules`` while it runs on
    ``batches`` (keyword-argument dicts), in call order, without gradients. The hooks are removed
    afterwards, also on an error."""
    calls: list[tuple[nn.Module, tuple, dict]] = []
    handles = [m.register_forward_pre_hook(lambda m, a, k: calls.append((m, a, k)), with_kwargs=True)
               for m in modules]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return calls
