"""`python -m kolm.cli ...` is the `kolm` command."""

import sys

from kolm.cli.main import main

# Guarded: datatrove's worker processes (kolm clean) re-import the main module.
if __name__ == "__main__":
    sys.exit(main())
