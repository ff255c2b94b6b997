"""Training (lessons 04-05): the config, the loop, evaluation, AdamW, schedules, checkpoints, the loss plot.

    cfg = TrainConfig(learning_rate=1e-4, num_train_epochs=3, output_dir="saves/sft", plot_loss=True)
    result = train(model, data.train, cfg, val_data=data.val, collate=PaddingCollator(tok), tokenizer=tok)
"""

from .config import TrainConfig, TrainConfigError
from .config_file import load_config
from .evaluate import evaluate
from .optim import make_optimizer, param_groups
from .schedule import lr_lambda, make_scheduler
from .trainer import TrainResult, causal_lm_loss, train

__all__ = ["TrainConfig", "TrainConfigError", "TrainResult", "causal_lm_loss", "evaluate", "load_config",
           "lr_lambda", "make_optimizer", "make_scheduler", "param_groups", "train"]
