import copy

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every test model is tiny: one intra-op thread is fastest on a shared 2-core host and makes
    float32 reductions (Hessians, matmuls) bit-reproducible from run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_template_registries():
    """Templates and schemes are class-level registries; tests (and the spec's examples, which
    unregister "int8" or replace "llama") must not leak changes into other tests."""
    from quark.torch.quantization.config.template import LLMTemplate

    templates = dict(LLMTemplate._templates)
    schemes = copy.copy(LLMTemplate._schemes._schemes)
    yield
    LLMTemplate._templates.clear()
    LLMTemplate._templates.update(templates)
    LLMTemplate._schemes._schemes.clear()
    LLMTemplate._schemes._schemes.update(schemes)
