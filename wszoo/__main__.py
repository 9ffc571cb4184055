"""``python -m wszoo ...`` (and so ``torchrun -m wszoo ...``) runs the CLI."""
import sys

from .cli import main

sys.exit(main())
