"""``python -m dwa_export``: the same as the ``dwa-export`` command."""

import sys

from ._cli import main

sys.exit(main())
