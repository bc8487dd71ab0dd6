"""``python -m kvstream.serving.pipeline``: one pipeline stage (run it under ``torchrun``)."""

import sys

from .cli import stage_main

sys.exit(stage_main())
