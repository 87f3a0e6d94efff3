"""`python -m kolm ...` is the `kolm` command (used with torchrun: `torchrun ... -m kolm train ...`)."""

import sys

from kolm.cli.main import main

# Guarded: datatrove's worker processes (kolm clean) re-import the main module.
if __name__ == "__main__":
    sys.exit(main())
