"""``python -m vllm_safeguard.testing.evasions OUT_DIR [...]``: write the corpus."""

import sys

from . import main

sys.exit(main())
