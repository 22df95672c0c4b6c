"""``python -m vllm_duo.cli``: the same as the ``vllm-duo`` console script."""

import sys

from vllm_duo.cli import main

sys.exit(main())
