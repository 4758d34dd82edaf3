"""`python -m vpblu ...`: the same command line as the `vpblu` script."""

import sys

from vpblu.cli import main

sys.exit(main())
