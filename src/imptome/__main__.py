"""`python -m imptome` is the `imptome` command (so `accelerate launch -m imptome ...` works)."""

import sys

from imptome.cli import main

sys.exit(main())
