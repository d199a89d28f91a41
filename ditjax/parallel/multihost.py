"""Multi-controller start-up: ``jax.distributed`` from explicit flags or the environment."""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)
_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Start jax.distributed when this is a multi-process run; a single process needs nothing.

    Explicit flags win; otherwise jax's cluster detection reads TPU-VM, SLURM and GKE environments.
    """
    if coordinator_address is not None:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif any(k in os.environ for k in _CLUSTER_ENV) and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
