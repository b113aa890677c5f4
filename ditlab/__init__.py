"""ditlab: post-training quantization lab for Diffusion Transformers."""

__version__ = "0.1.0"
