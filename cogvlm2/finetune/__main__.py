"""`python -m cogvlm2.finetune {finetune,merge-lora} ...` (what distributed launchers start on every rank)."""

import sys

from .cli import main

sys.exit(main())
