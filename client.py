#!/usr/bin/env python3
"""``python client.py``: the client's command line (cloudkon/client.py), where the docs say it is."""

import sys

from cloudkon.client import main

if __name__ == "__main__":
    sys.exit(main())
