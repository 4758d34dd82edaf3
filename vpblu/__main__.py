"""`python -m vpblu`: the same command line as `vpblu`."""

import sys

from vpblu.cli import main

sys.exit(main())
