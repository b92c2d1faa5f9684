"""`python -m minigrpo` is the `minigrpo` command."""

import sys

from minigrpo.cli import main

sys.exit(main())
