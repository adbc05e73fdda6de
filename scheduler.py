#!/usr/bin/env python3
"""``python scheduler.py``: the scheduler's command line (cloudkon/scheduler.py), where the docs say it is."""

import sys

from cloudkon.scheduler import main

if __name__ == "__main__":
    sys.exit(main())
