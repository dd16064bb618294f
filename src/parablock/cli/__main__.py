"""``python -m parablock.cli``: the ``parablock`` command."""

import sys

from parablock.cli.main import main

sys.exit(main())
