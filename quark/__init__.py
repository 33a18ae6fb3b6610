"""quark: post-training quantization of LLMs."""
