from . import plans
from .activation_checkpoint import apply_activation_checkpointing
from .context_parallel import apply_context_parallel
from .data_parallel import apply_data_parallel, apply_hybrid_parallel, compile_model
from .expert_parallel import apply_expert_parallel
from .parallelize import parallelize
from .pipeline_parallel import apply_pipeline_parallel
from .plan import GPT2_TP_CONFIG, ColumnParallel, RowParallel, VocabParallel, gpt2_tp_config
from .tensor_parallel import apply_tensor_parallel
from .token_mean import token_mean
from .zero import shard_optimizer

__all__ = ["apply_tensor_parallel", "apply_data_parallel", "apply_hybrid_parallel",
           "ColumnParallel", "RowParallel", "VocabParallel", "GPT2_TP_CONFIG",
           "apply_context_parallel", "apply_expert_parallel", "gpt2_tp_config", "parallelize", "plans",
           "shard_optimizer", "compile_model", "apply_pipeline_parallel", "apply_activation_checkpointing",
           "token_mean"]
