"""`python -m stealguard.service serve|keys|audit ...` (the same commands as `stealguard`)."""

import sys

from stealguard.errors import StealguardError
from stealguard.service.cli import standalone_app

if __name__ == "__main__":
    try:
        standalone_app()()
    except StealguardError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
