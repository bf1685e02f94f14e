from .optim import build_optimizer, clip_grad_norm_, lr_at
from .trainer import TrainConfig, build_model, evaluate, train

__all__ = ["TrainConfig", "train", "build_model", "evaluate", "build_optimizer", "clip_grad_norm_", "lr_at"]
