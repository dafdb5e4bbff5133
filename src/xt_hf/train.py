"""Fine-tune an xT classifier or segmenter with 🤗 Accelerate: `xt-hf train`, `python -m xt_hf.train`,
`accelerate launch ... -m xt_hf.train --config FILE [--set key=value ...]`.

The code lives in the `xt_hf.training` package (settings, data, tasks, loop, metrics); this module is the
command's entry point and keeps the names that used to be defined here.
"""

from __future__ import annotations

import sys

from .training import (
    ClassificationTask,
    SegmentationTask,
    TrainConfig,
    make_task,
    parameter_groups,
    read_config_file,
    save_checkpoint,
    train,
)
from .training.command import add_parser, main, run

if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["ClassificationTask", "SegmentationTask", "TrainConfig", "add_parser", "main", "make_task",
           "parameter_groups", "read_config_file", "run", "save_checkpoint", "train"]
