"""`python -m kerasntk ...`: the `kerasntk` command."""

import sys

from kerasntk.cli import main

sys.exit(main())
