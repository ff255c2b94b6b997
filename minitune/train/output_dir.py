"""One output_dir, one run: a new run never writes into another run's folder by accident.

A run's folder holds its log, its checkpoints and its final model. A second run written into it
would mix the two: the old checkpoint-500 beside the new checkpoint-100 (a later resume would pick
the old one), the old adapter files beside the new model, one log cut into another. So at the start
of a run, `check_output_dir` (the command line calls it before the model loads; `train` and the RL
loops call it again, for when they are used as a library):

    output_dir holds another run's files  ->  an error naming the folder, unless
        resume: true                 continue that run from its newest complete checkpoint
        overwrite_output_dir: true   delete that run's files first, then start afresh
    both set                         an error: one continues what the other deletes

LLaMA-Factory has the same two keys. It also resumes on its own when output_dir holds a checkpoint,
and with an explicit resume_from_checkpoint plus overwrite_output_dir it resumes and deletes the old
log; minitune resumes only when asked and calls that pair a contradiction, since either reading
loses something the user may have wanted.

Only the files a run writes are recognised and deleted (the log, the loss pictures, checkpoint-N/,
the model, adapter and tokenizer files); anything else in the folder is left alone. The hidden
temporary folders of a killed run (minitune.atomic) are incomplete by definition and are removed at
every start: one run owns its folder, so no other process is writing them.

Only rank 0 looks at the folder: it is the process that writes the files (train/distributed.py).
"""

import re
import shutil
from pathlib import Path

from tqdm import tqdm

from ..atomic import leftovers
from . import distributed as dist
from .config import TrainConfigError

# what minitune writes into output_dir: trainer.py (log, picture, checkpoints), cli.py (RL pictures),
# finetuning.py / checkpoint.save_final (model, adapter, tokenizer), rlhf/reward.py (value head)
RUN_FILES = ("trainer_log.jsonl", "config.json", "generation_config.json", "model.safetensors",
             "model.safetensors.index.json", "value_head.safetensors", "adapter_config.json",
             "adapter_model.safetensors", "minitune_adapter.json", "minitune_adapter.safetensors",
             "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
RUN_PATTERNS = re.compile(r"checkpoint-\d+|model-\d+-of-\d+\.safetensors|training_\w+\.png")


def run_files(cfg) -> list[Path]:
    """The files and checkpoint folders of a run in cfg.output_dir (and cfg.log_path, an RL loop's log,
    when it lies there)."""
    out = Path(cfg.output_dir)
    if not out.is_dir():
        return []
    log = getattr(cfg, "log_path", None)
    own = {Path(log).resolve()} if log else set()
    return sorted(p for p in out.iterdir()
                  if p.name in RUN_FILES or RUN_PATTERNS.fullmatch(p.name) or p.resolve() in own)


def check_output_settings(cfg) -> None:
    """The settings alone, on every process: save_total_limit >= 1, not resume with overwrite_output_dir,
    and overwrite_output_dir never aimed at the model being trained from."""
    limit = getattr(cfg, "save_total_limit", None)
    if limit is not None and limit < 1:
        raise TrainConfigError(f"save_total_limit: must be >= 1 (how many of the newest checkpoints to keep; "
                               f"unset: all), got {limit}")
    if not cfg.output_dir:
        return
    overwrite = getattr(cfg, "overwrite_output_dir", False)
    if overwrite and cfg.resume:
        raise TrainConfigError(f"resume and overwrite_output_dir are both set: resume continues the run in "
                               f"{cfg.output_dir}, overwrite_output_dir deletes it; set only one")
    model = getattr(cfg, "model_name_or_path", None)
    if overwrite and model and Path(model).resolve() == Path(cfg.output_dir).resolve():
        raise TrainConfigError(f"output_dir {cfg.output_dir} is also model_name_or_path: overwrite_output_dir would "
                               "delete the model this run starts from; write the run into a folder of its own")


def check_output_dir(cfg) -> None:
    """At the start of a run: refuse or clear a used output_dir (see the module docstring), remove the
    leftovers of a killed run. cfg: a TrainConfig, PPOConfig or GRPOConfig (output_dir, resume,
    overwrite_output_dir, save_total_limit; log_path for the RL loops)."""
    check_output_settings(cfg)
    if not cfg.output_dir or not dist.is_main():
        return
    out = Path(cfg.output_dir)
    stale = leftovers(out)
    if stale:
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        tqdm.write(f"removed {len(stale)} unfinished temporary folder(s) that an interrupted run left in {out}: "
                   f"{', '.join(p.name for p in stale[:3])}{' ...' if len(stale) > 3 else ''}")
    if cfg.resume:
        return
    found = run_files(cfg)
    if not found:
        return
    names = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    if not getattr(cfg, "overwrite_output_dir", False):
        raise TrainConfigError(f"{out}: holds another run's files ({names}); set resume to continue that run, or "
                               "overwrite_output_dir to delete them and start afresh (or choose another output_dir)")
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    tqdm.write(f"overwrite_output_dir: removed the previous run's files from {out} ({names})")
