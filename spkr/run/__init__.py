"""spkr.run — the run stage: everything between a built model and a finished run directory.

    distributed  process group from torchrun's environment, device, THE dtype policy (one name map,
                 ``resolve_dtype``), autocast, GradScaler choice, all-reduce / gather helpers
    configs      TrainConfig (the ``[train]`` table), bundled configs, ``--config`` resolution, compile policy
    rundir       the run directory decision (``runs/<shards name>[-N]``, torchrun restarts, resume)
    checkpoint   training state pack / restore (the file format itself is :mod:`spkr.checkpoint`)
    metrics      metrics.jsonl rows and console logging (rank 0)
    evaluation   the one evaluation entry (evaluate_split, EvalOptions), the eval splits of a manifest,
                 the evaluation-loader builder, distributed passes, trial-list verification, AS-norm cohort
    mel_augment  SpecAugment and the random-microphone EQ of training batches
    trainer      the training parts: the data, the Trainer (build, restore, one step, one epoch, final test)
    cli          the one error/exit convention of the CLIs (``cli_main``)

This stage imports earlier ones (config, manifest, stream, models, scoring); nothing earlier imports it.
"""

from spkr.errors import SpkrError


class TrainError(SpkrError, RuntimeError):
    """A problem the user can fix (bad input, incompatible checkpoint); printed without a traceback."""
