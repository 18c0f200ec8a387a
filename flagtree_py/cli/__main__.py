"""`python -m flagtree_py.cli ...` runs the `flagtree` command."""

import sys

from flagtree_py.cli.main import main

sys.exit(main())
