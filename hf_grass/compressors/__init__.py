"""Gradient compressors, one file each, registered by name.

>>> from hf_grass.compressors import build_compressor
>>> c = build_compressor(config, module_name="model.layers.0.mlp.up_proj", d_in=64, d_out=32)
>>> c.compress(x, delta)            # x [B,T,d_in], delta [B,T,d_out] -> [B, config.proj_dim]
>>> c.compress_gradient(g)          # g [B,d_out,d_in] -> [B, config.proj_dim]
"""

# Importing the modules registers them; adding a compressor means adding a file and a line here.
from hf_grass.compressors import factgrass, fjlt, grass, logra, mask, random, sjlt  # noqa: F401
from hf_grass.compressors.base import (
    Compressor,
    FactorisedCompressor,
    available_compressors,
    build_compressor,
    register_compressor,
)

__all__ = [
    "Compressor",
    "FactorisedCompressor",
    "available_compressors",
    "build_compressor",
    "register_compressor",
]
