"""The dry run's documented command, an entry point: `python -m r1jax.parallel.dryrun CONFIG
[devices=N] [key=value ...]`. The code is `r1jax.train.dryrun` (it compiles the train step, so
it sits above `train`); this module only re-exports it, and the layering test
(tests/test_layering.py, ENTRY_POINTS) allows its one upward import. Importing it imports no JAX,
so `devices=N` still takes effect before JAX starts.
"""

import sys

from r1jax.train.dryrun import REMAT_WARNING, CaptureStderr, DryRunReport, dry_run, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
