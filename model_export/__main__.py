"""`python -m model_export`: same as the `lensnet-export` console script."""

import sys

from .cli import main

sys.exit(main())
