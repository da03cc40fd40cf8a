"""``python -m worker`` is ``broker worker``."""

import sys

from broker.cli import main

main(["worker", *sys.argv[1:]])
