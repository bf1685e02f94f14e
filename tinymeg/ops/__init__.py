"""Fused custom ops in the ``tinymeg`` namespace and the runtime autotuner that picks their kernels.

Importing this package registers ``torch.ops.tinymeg.{layer_norm, bias_gelu,
linear_cross_entropy, grouped_mm, rms_norm, swiglu}`` and their ``*_backward`` ops, with fake
kernels (torch.compile), autograd formulas and DTensor sharding rules. One file per op: ``norm``
(layer_norm), ``gelu`` (bias_gelu), ``cross_entropy`` (linear_cross_entropy), ``grouped``
(grouped_mm, the mixture of experts' matmul), ``rmsnorm`` (rms_norm) and ``glu`` (swiglu), Llama's; each lists
its implementations in ``FORWARD`` and ``BACKWARD``.
The functions below are the friendly wrappers.
"""
from . import autotune, cross_entropy, gelu, glu, grouped, norm, rmsnorm
from .autotune import RuntimeAutoTuner, get_default_tuner, set_default_tuner, synchronized
from .cross_entropy import linear_cross_entropy
from .gelu import bias_gelu, bias_gelu_path
from .grouped import grouped_mm
from .norm import LayerNorm, layer_norm
from .glu import swiglu
from .rmsnorm import RMSNorm, rms_norm

# op name -> the module that defines it: the dense GPT-2's fused ops (grouped_mm, used by MoE
# layers only, is in ``grouped``), and Llama's
OPS = {"layer_norm": norm, "bias_gelu": gelu, "linear_cross_entropy": cross_entropy}
LLAMA_OPS = {"rms_norm": rmsnorm, "swiglu": glu, "linear_cross_entropy": cross_entropy}

__all__ = ["LayerNorm", "RuntimeAutoTuner", "get_default_tuner", "set_default_tuner", "synchronized",
           "layer_norm", "bias_gelu", "bias_gelu_path", "linear_cross_entropy", "grouped_mm", "autotune", "OPS",
           "RMSNorm", "rms_norm", "swiglu", "LLAMA_OPS"]
