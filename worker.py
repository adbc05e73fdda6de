#!/usr/bin/env python3
"""``python worker.py``: the worker's command line (cloudkon/worker.py), where the docs say it is."""

import sys

from cloudkon.worker import main

if __name__ == "__main__":
    sys.exit(main())
