"""``python -m pwff_app.instruct.rewards``: the same as ``pwff train-rewards``."""

import sys

from pwff_app.instruct.rewards.cli import main

sys.exit(main())
