from .data_parallel import apply_data_parallel, apply_hybrid_parallel, compile_model
from .plan import GPT2_TP_CONFIG, ColumnParallel, RowParallel, VocabParallel
from .tensor_parallel import apply_tensor_parallel
from .zero import shard_optimizer

__all__ = ["apply_tensor_parallel", "apply_data_parallel", "apply_hybrid_parallel",
           "ColumnParallel", "RowParallel", "VocabParallel", "GPT2_TP_CONFIG",
           "shard_optimizer", "compile_model"]
