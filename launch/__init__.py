"""Launchers: sweeps (local, Slurm, TPU), TPU pods, GKE via xpk, Slurm. See launch/README.md."""
