"""Multi-controller start-up: ``jax.distributed`` from explicit flags or the environment."""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)
_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def _cluster_detected() -> bool:
    """A multi-process launcher jax can read: SLURM with >1 task, GKE/xpk TPU pods, or a Cloud TPU VM
    (whose workers are listed in the VM metadata, not the environment)."""
    if any(k in os.environ for k in _CLUSTER_ENV):
        return int(os.environ.get("SLURM_NTASKS", "2")) > 1
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm  # no public equivalent
    except ImportError:
        return False
    return bool(running_in_cloud_tpu_vm)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Start jax.distributed when this is a multi-process run; a single process needs nothing.

    Explicit flags win (local multi-process runs, SLURM via launch/slurm.py); otherwise jax's cluster
    detection reads the TPU-VM, GKE and SLURM environments.
    """
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _cluster_detected():
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
