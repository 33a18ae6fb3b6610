"""Export of quantized models and the names transformers' quark integration imports.

- :mod:`.api`: ``export_safetensors``, ``import_model_from_safetensors``, ``_map_to_quark`` (what
  transformers calls to build quantized modules before loading), ``save_params``/``load_params``.
- :mod:`.awq`: the AutoAWQ ``qweight``/``qzeros``/``scales`` layout.
- :mod:`.safetensors_io`: sharded, atomic writing and checked reading of safetensors folders.
- :mod:`.config.config`: ``JsonExporterConfig`` (the ``export`` block of config.json).
- :mod:`.main_export.quant_config_parser`: ``QuantConfigParser`` (QConfig from AWQ / fp8 configs).

The stored tensors of each weight format (what a frozen layer holds and export writes) are
:mod:`quark.torch.quantization.layouts`. Nothing is imported here: the modules load on first use.
"""
