"""``adasap`` command line: a thin layer over :mod:`adasap.experiments`.

Flags, YAML files and run directories share one flat key space (``--rho-max`` is ``rho_max``):
``options`` holds the flag table, ``app`` the subcommands.
User errors print one line (``error: ...``) and exit with code 2, no traceback; a diverged run
exits with 3 and an interrupted one with 130, both keeping their checkpoint. Started by
torchrun (``torchrun --nproc_per_node N -m adasap run ...``), ``run``, ``train`` and ``eval``
join its process group and train data-parallel; rank 0 alone prints (docs/distributed.md).
"""

from adasap.cli.app import build_parser, config_from_args, main

__all__ = ["build_parser", "config_from_args", "main"]
