"""`python -m node ...` — same as the `node` console command."""

import sys

from node.faces import main

sys.exit(main())
