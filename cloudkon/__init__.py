"""CloudKon-py: run every line of a workload on local worker processes or on EC2 workers fed
through SQS, and bring back every result.

The command lines are ``cloudkon client|scheduler|worker`` (cloudkon/__main__.py), also run as
``python client.py``, ``python scheduler.py`` and ``python worker.py`` from a checkout.
docs/architecture.md draws the modules, what each owns and the direction of imports.
Importing the package loads nothing else: a local run never loads what it does not use.
"""

__version__ = "0.1.0"
