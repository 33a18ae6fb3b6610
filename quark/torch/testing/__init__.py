"""Test harness of ``quark.torch``: builders of tiny random models and the template-coverage harness.

* :mod:`quark.torch.testing.tiny_models`: a tiny randomly initialised model (2 decoder blocks,
  hidden size 64, 4 experts) of every architecture transformers ships that has an ``LLMTemplate``,
  built from its config without any download, and the module listings of the remote-code
  architectures (``data/remote_code_module_names.json``, installed with the package).
* :mod:`quark.torch.testing.coverage`: the template-coverage harness (quantize, export and reload a
  tiny model per template and column) behind ``docs/architectures.md`` and ``bench/coverage.py``.
* :mod:`quark.torch.testing.calls`: record the calls a model makes to some of its modules (to measure
  those modules on their real inputs).

For tests, benchmarks and users checking a template of their own. Nothing in the library proper
imports this package (it sits above ``quark.torch`` in the layer order).
"""
