"""`python -m bench`: every benchmark on this machine, then docs/performance.md (bench/run.py)."""

import sys

from bench.run import main

sys.exit(main())
