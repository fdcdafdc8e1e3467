"""`python -m hubmerge` (also what `accelerate launch -m hubmerge` runs)."""

from hubmerge.cli import app

app(prog_name="hubmerge")
