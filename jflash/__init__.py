"""jflash: FlashAttention as JAX Pallas GPU kernels."""

from jflash._src.api import dot_product_attention
from jflash._src.flax_adapter import flax_attention_fn
from jflash._src.ring_api import ring_attention
from jflash._src.zigzag import from_zigzag, to_zigzag

__all__ = ["dot_product_attention"]
__all__ += ["flax_attention_fn", "linen", "nnx"]
__all__ += ["ring_attention", "to_zigzag", "from_zigzag"]
__version__ = "0.1.0"


def __getattr__(name):
  # `jflash.linen` / `jflash.nnx` import Flax, so they load on first use, not with jflash.
  if name in ("linen", "nnx"):
    import importlib
    return importlib.import_module(f"jflash.{name}")
  raise AttributeError(f"module 'jflash' has no attribute {name!r}")
