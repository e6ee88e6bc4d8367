"""``python -m leantrain.train CONFIG [key=value ...]``: the entry point torchrun launches."""

import sys

from leantrain.trainer.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
