import sys

from gatedmoe.cli.main import main

sys.exit(main())
