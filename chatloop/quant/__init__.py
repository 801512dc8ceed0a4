"""Weight-only quantization: GGUF's block formats, the layers that compute with them, and turning a stage's
linear layers into them (see :mod:`~chatloop.quant.formats`)."""

from .blocks import GGUF_TYPES, dequantize_blocks, row_bytes
from .formats import BLOCK, BLOCK_BYTES, FORMATS, dequantize, in_features_of, q4_0_as_q4_1, quantize
from .modules import QuantEmbedding, QuantLinear

__all__ = ["BLOCK", "BLOCK_BYTES", "FORMATS", "GGUF_TYPES", "QuantEmbedding", "QuantLinear", "dequantize",
           "dequantize_blocks", "in_features_of", "q4_0_as_q4_1", "quantize", "row_bytes"]
