"""`python -m kolm ...` is the `kolm` command (used with torchrun: `torchrun ... -m kolm train ...`)."""

import sys

from kolm.cli.main import main

sys.exit(main())
