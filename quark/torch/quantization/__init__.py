"""Quantization: config (what), numerics (how numbers are encoded), quantizer and modules."""
