"""`python -m grit_pipeline` is the `grit` command."""

from grit_pipeline.cli import main

main()
