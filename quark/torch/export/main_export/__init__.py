"""Config parsing for custom export modes (AWQ / fp8 configs as transformers hands them over)."""
