"""Quantization: config (what), numerics (how numbers are encoded), quantizer and modules, and what a
quantized model needs at run time: the stored weight layouts (:mod:`.layouts`), the Hadamard transforms
(:mod:`.hadamard`) and the online rotation of rotated models (:mod:`.online_rotation`)."""
