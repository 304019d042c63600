"""jflash: FlashAttention as JAX Pallas GPU kernels."""

from jflash._src.api import dot_product_attention

__all__ = ["dot_product_attention"]
__version__ = "0.1.0"
