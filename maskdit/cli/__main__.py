"""`python -m maskdit.cli ...` (and `torchrun -m maskdit.cli train ...`, as the README shows): the `maskdit` command."""

from maskdit.cli import app

app()
