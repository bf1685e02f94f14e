from .functional import copy_to_tp, gather_from_tp, reduce_from_tp
from .layers import (ColumnParallelLinear, LayerNorm, ReplicatedEmbedding, ReplicatedLinear,
                     RMSNorm, RowParallelLinear, VocabParallelEmbedding, local)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "LayerNorm",
           "RMSNorm", "ReplicatedEmbedding", "ReplicatedLinear", "copy_to_tp", "reduce_from_tp",
           "gather_from_tp", "local"]
