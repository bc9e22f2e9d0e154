"""``python -m intake_verify``: the same as ``intake-verify``."""

import sys

from intake_verify.cli import main

sys.exit(main())
