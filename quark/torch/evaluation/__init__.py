"""Calibration data and perplexity evaluation under the project's shared benchmark protocol.

See :mod:`quark.torch.evaluation.data` for where the text comes from and how it is tokenized, and
:mod:`quark.torch.evaluation.perplexity` for how the number is computed.
"""

from .data import (
    DATA_DIR_ENV,
    calibration_dataloader,
    calibration_file,
    calibration_text,
    read_calibration_file,
    shared_data_dir,
    test_file,
    test_text,
    token_windows,
    tokenize_text,
)
from .perplexity import evaluate_shared_protocol, perplexity, window_loss

__all__ = [
    "DATA_DIR_ENV",
    "calibration_dataloader",
    "calibration_file",
    "calibration_text",
    "evaluate_shared_protocol",
    "perplexity",
    "read_calibration_file",
    "shared_data_dir",
    "test_file",
    "test_text",
    "token_windows",
    "tokenize_text",
    "window_loss",
]
