"""`python -m metaformer ...` runs the `metaformer` command (what child processes of scripts call)."""

from metaformer.cli import entry

entry()
