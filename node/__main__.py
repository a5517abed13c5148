"""`python -m node ...` — same as the `node` console command."""

import sys

from node.cli import main

sys.exit(main())
