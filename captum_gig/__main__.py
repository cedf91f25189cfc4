"""``python -m captum_gig``: the same as the ``captum-gig`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
