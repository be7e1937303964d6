"""`python -m trident ...` is the `trident` command (used under torchrun)."""

import sys

from trident.tools.cli import main

sys.exit(main())
