"""``python -m prefopt.cli train ...``: the same as the ``prefopt`` command."""

import sys

from prefopt.cli import main

sys.exit(main())
