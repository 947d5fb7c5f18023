"""``svd-serve train``: the adapter training loop, one module per phase, read top to bottom.

    train(cfg)                                                              loop.py
      start          everything before the first step, in three phases:
      check_config   every bad input is refused before any work (options, files,     config.py
                     output directory; types and bounds from TrainConfig's schema)
      Processes      one process, or data-parallel ranks under torchrun              distributed.py
      read_data      rows → tokens; rows without a single target token are refused   inputs.py
                     or counted
      prepare_out    the output directory (refused, or an earlier run's files        inputs.py
                     removed with --overwrite)
      setup          base → targets → (calibrate) → adapter, fresh, a checkpoint's   loop.py
                     or given → init health check (a fresh adapter)                  health.py
                     → padding-free attention                                        attention.py
                     → AdamW over the adapter only → the run's state
      fit            per step: lr → one global batch (all accumulation steps, all    schedule.py
                     ranks) of every data part, loss = Σ_parts weight · Σ masked     loss.py
                     loss / target tokens of the part's whole global batch + the
                     method's regularizer → gradients summed over ranks → clip →
                     step → the method's hook (and a fresh optimizer state for what
                     the hook re-factorised) → record, evaluate, checkpoint          checkpoint.py
      finish         the final adapter at ``out``, the loss plot

A micro-batch's examples are packed into fewer rows of the same width (positions restarting at 0
for each) when a check at the start shows the model keeps them apart; otherwise they are padded.
The data order is a pure function of (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have seen, and any split of a global batch into ranks × accumulation steps ×
micro-batches gives the same update.

The data mode decides the parts (:class:`Part`) and the loss of each (:data:`LOSSES`): ``--data``
is one part with cross-entropy; unlearning (``--forget-data``) is a forget part with LoKU's inverted
hinge loss and, with ``--retain-data``, a retain part with cross-entropy. Every step takes one global
batch of each part (``--batch-size`` rows per process and accumulation step, each part in its own
seeded order); epochs count the first part.
"""

from .attention import FLOAT32_SDPA, sdpa_attention
from .checkpoint import TrainState
from .config import COMPUTE_DTYPES, PATH_FIELDS, SCHEDULES, TrainConfig, check_config, load_config, method_options
from .distributed import Processes
from .health import check_init, parse_limit
from .inputs import Part, Rows
from .loop import Run, evaluate, fit, new_adapter, start, train
from .loss import LOSSES, batching, inverted_hinge, logits, loss_sum
from .schedule import global_batch, lr_at

__all__ = ["COMPUTE_DTYPES", "FLOAT32_SDPA", "LOSSES", "PATH_FIELDS", "SCHEDULES", "Part", "Processes", "Rows", "Run",
           "TrainConfig", "TrainState", "batching", "check_config", "check_init", "evaluate", "fit", "global_batch",
           "inverted_hinge", "load_config", "logits", "loss_sum", "lr_at", "method_options", "new_adapter",
           "parse_limit", "sdpa_attention", "start", "train"]
