"""`python -m bench`: DTask and its peers, same workload, same machine, same run."""

import sys

from bench.suite.cli import main

if __name__ == "__main__":
    sys.exit(main())
