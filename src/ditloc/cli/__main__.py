"""`python -m ditloc.cli ...` (also `torchrun ... -m ditloc.cli`, `accelerate launch ... -m ditloc.cli`)."""

import sys

from . import main

sys.exit(main())
