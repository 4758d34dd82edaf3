"""`python -m vpblu.lab.wholestate controller ...`: the controller, every change pushed whole.

The benchmark's baseline for what deltas save (`python -m vpblu.bench --compare`):
the same command line as `vpblu`, in a process where the StateActor sends each
node's new state as a PushSync however small the change. The product has no such
switch; this process replaces the one decision, and nothing else.
"""

import sys

from vpblu.actors import state
from vpblu.cli import main


def _always(changes: int, size: int) -> bool:
    return True


if __name__ == "__main__":
    state.whole_state_cheaper = _always
    sys.exit(main())
