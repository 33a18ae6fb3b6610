import copy

import pytest


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
