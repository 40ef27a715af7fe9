"""`python -m orpo ...` = the `orpo` command (what torchrun and accelerate launch take: `-m orpo train ...`)."""
import sys

from orpo.commands.cli import main

sys.exit(main())
