"""python -m ditjax.train --config configs/FILE.py[:ARG] --workdir DIR [--config.a.b=value …]"""
from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:ARG]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples (resumes if present).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    del argv
    from ditjax import runtime
    runtime.start_cli()  # XLA:CPU flags and malloc reuse before the backend starts, then logging
    from ditjax.parallel.multihost import initialize
    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import jax
    from ditjax.config import ConfigError, validate
    from ditjax.train.errors import NonFiniteLossError
    try:  # before the trainer (orbax, grain, TFDS) is even imported: a bad config fails in seconds
        validate(_CONFIG.value, num_devices=jax.device_count(), num_processes=jax.process_count())
        from ditjax.train.loop import train
        train(_CONFIG.value, _WORKDIR.value)
    except ConfigError as err:
        logging.error("invalid config: %s", err)
        return 2
    except NonFiniteLossError as err:
        logging.error("%s", err)
        return 3
    return 0


if __name__ == "__main__":
    app.run(main)
