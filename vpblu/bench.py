"""`python -m vpblu.bench`: the convergence benchmark's entry point.

The benchmark is harness, not product: it lives in `vpblu.lab.bench`; this
module only keeps the command users type.
"""

import sys

from vpblu.lab.bench import main

if __name__ == "__main__":
    sys.exit(main())
