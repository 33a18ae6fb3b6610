"""quark: post-training quantization of LLMs."""

#: the package version (pyproject.toml); transformers' quark integration reads ``quark.__version__``
__version__ = "0.12.0"
