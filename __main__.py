"""``python -m leantrain``: the same as the ``leantrain`` command."""

import sys

from leantrain.trainer.cli import main

sys.exit(main())
