"""``python -m lora_ft`` (and ``accelerate launch -m lora_ft``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
