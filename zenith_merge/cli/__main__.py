"""`python -m zenith_merge.cli`: the same as the `zenith-merge` command."""

import sys

from . import main

sys.exit(main())
