"""``python -m gatedmoe ...``: the `gatedmoe` command (`gatedmoe.cli.main`)."""

import sys

from gatedmoe.cli.main import main

sys.exit(main())
