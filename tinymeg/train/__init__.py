from .optim import build_optimizer, clip_grad_norm_, lr_at
from .trainer import TrainConfig, build_model, evaluate, train
from .cli import exit_process, parse_args

__all__ = ["TrainConfig", "train", "build_model", "evaluate", "build_optimizer", "clip_grad_norm_", "lr_at",
           "parse_args", "exit_process"]
