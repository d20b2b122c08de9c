"""`python -m service`: same as the `lensnet-serve` console script."""

import sys

from .cli import main

sys.exit(main())
