from .data_parallel import apply_data_parallel, apply_hybrid_parallel
from .pipeline_parallel import apply_pipeline_parallel
from .plan import GPT2_TP_CONFIG, ColumnParallel, RowParallel, VocabParallel
from .tensor_parallel import apply_tensor_parallel

__all__ = ["apply_tensor_parallel", "apply_data_parallel", "apply_hybrid_parallel", "apply_pipeline_parallel",
           "ColumnParallel", "RowParallel", "VocabParallel", "GPT2_TP_CONFIG"]
