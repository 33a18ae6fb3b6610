"""The public names of quark's safetensors export and import (``quark.torch`` re-exports them).

- :func:`export_safetensors` (:mod:`.writing`): a quantized model as a Hugging Face safetensors folder,
  ``quant_method: "quark"`` or the AutoAWQ layout.
- :func:`import_model_from_safetensors` (:mod:`.reading`): the quantized model back from such a folder.
- :func:`save_params` / :func:`load_params` (:mod:`.params`): a model's quantized state, as it is.
- ``_map_to_quark`` (:func:`.reading.map_to_quark`): the placeholders transformers' quark integration
  builds before it loads a checkpoint; it imports this name from here.
- :class:`CheckpointError` (:mod:`.safetensors_io`): a folder or file that cannot be read.

The tensors and names a checkpoint holds: :mod:`.checkpoint_tensors` and :mod:`.checkpoint_keys`.
"""

from __future__ import annotations

from .params import load_params, save_params
from .reading import import_model_from_safetensors
from .reading import map_to_quark as _map_to_quark  # noqa: F401  (transformers imports this name from here)
from .safetensors_io import CheckpointError
from .writing import export_safetensors

__all__ = [
    "export_safetensors",
    "import_model_from_safetensors",
    "save_params",
    "load_params",
    "CheckpointError",
]
