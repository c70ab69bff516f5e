"""`python -m metaformer ...` runs the `metaformer` command (what child processes of scripts call)."""

import sys

from metaformer.cli import main

sys.exit(main())
