"""``python -m vllm_safeguard.testing.attacks OUT_DIR [--base-model DIR]``: write the corpus."""

import sys

from . import main

sys.exit(main())
