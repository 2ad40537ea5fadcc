"""`python -m linrec.cli`: the same as the `linrec` command."""

import sys

from linrec.cli import main

sys.exit(main())
