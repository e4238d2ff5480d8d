"""A LOCAL EMULATION of a cluster on one Linux machine, for tests, teaching and measurement.

Each node is a network namespace plus its own hostname (a UTS namespace) with
its own address on a bridge, sshd and slurmd, on its own cores; slurmctld and
munge run on the host. The engines (sshd, Slurm, Horovod's Gloo) are the real
ones; only the hosts are emulated (as kind or Slurm's docker-compose CI do).

Imports: core.
"""
