"""Export of quantized models and the names transformers' quark integration imports.

- :mod:`.api`: the public names, ``export_safetensors``, ``import_model_from_safetensors``,
  ``save_params``/``load_params`` and ``_map_to_quark`` (what transformers calls to build quantized
  modules before loading), re-exported from the modules below.
- :mod:`.writing`: ``export_safetensors``, the checks before writing, config.json.
- :mod:`.reading`: ``import_model_from_safetensors``, ``map_to_quark`` (quantized placeholders), loading state.
- :mod:`.params`: ``save_params``/``load_params``.
- :mod:`.checkpoint_tensors`: the one walk over a model's state that every layout writes from.
- :mod:`.checkpoint_keys`: module state names <-> checkpoint names.
- :mod:`.experts`: checkpoint names and tensors of quantized fused MoE experts.
- :mod:`.awq`: the AutoAWQ ``qweight``/``qzeros``/``scales`` layout.
- :mod:`.file2file`: file-to-file quantization of a float checkpoint, shard by shard.
- :mod:`.gguf`: GGUF export.
- :mod:`.safetensors_io`: sharded, atomic writing and checked reading of safetensors folders.
- :mod:`.config.config`: ``JsonExporterConfig`` (the ``export`` block of config.json).
- :mod:`.main_export.quant_config_parser`: ``QuantConfigParser`` (QConfig from AWQ / fp8 configs).

The stored tensors of each weight format (what a frozen layer holds and export writes) are
:mod:`quark.torch.quantization.layouts`. Nothing is imported here: the modules load on first use.
"""
