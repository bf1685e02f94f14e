"""tinymeg: tensor, data and hybrid parallel training of transformers on DeviceMesh and DTensor."""
from . import models
from .context import ParallelContext
from .parallel import (GPT2_TP_CONFIG, ColumnParallel, RowParallel, VocabParallel,
                       apply_data_parallel, apply_hybrid_parallel, apply_tensor_parallel,
                       shard_optimizer)
from .parallel import (apply_activation_checkpointing, apply_context_parallel, apply_expert_parallel,
                       apply_pipeline_parallel, gpt2_tp_config, parallelize, plans, token_mean)
from .parallel.comm import comm_report

__all__ = ["ParallelContext", "apply_tensor_parallel", "apply_data_parallel", "apply_hybrid_parallel",
           "ColumnParallel", "RowParallel", "VocabParallel", "GPT2_TP_CONFIG", "comm_report", "models",
           "apply_context_parallel", "apply_expert_parallel", "gpt2_tp_config", "parallelize", "plans",
           "shard_optimizer", "apply_pipeline_parallel", "apply_activation_checkpointing", "token_mean"]
