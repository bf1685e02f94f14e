"""Fused custom ops in the ``tinymeg`` namespace and the runtime autotuner that picks their kernels.

Importing this package registers ``torch.ops.tinymeg.{layer_norm, bias_gelu,
linear_cross_entropy, grouped_mm}`` and their ``*_backward`` ops, with fake kernels (torch.compile),
autograd formulas and DTensor sharding rules. One file per op: ``norm`` (layer_norm),
``gelu`` (bias_gelu), ``cross_entropy`` (linear_cross_entropy), ``grouped`` (grouped_mm, the
mixture of experts' matmul); each lists its implementations in ``FORWARD`` and ``BACKWARD``.
The functions below are the friendly wrappers.
"""
from . import autotune, cross_entropy, gelu, grouped, norm
from .autotune import RuntimeAutoTuner, get_default_tuner, set_default_tuner, synchronized
from .cross_entropy import linear_cross_entropy
from .gelu import bias_gelu
from .grouped import grouped_mm
from .norm import LayerNorm, layer_norm

# op name -> the module that defines it: the dense GPT-2's fused ops (grouped_mm, used by MoE
# layers only, is in ``grouped``)
OPS = {"layer_norm": norm, "bias_gelu": gelu, "linear_cross_entropy": cross_entropy}

__all__ = ["LayerNorm", "RuntimeAutoTuner", "get_default_tuner", "set_default_tuner", "synchronized",
           "layer_norm", "bias_gelu", "linear_cross_entropy", "grouped_mm", "autotune", "OPS"]
