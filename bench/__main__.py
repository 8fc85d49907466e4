"""`python -m bench`: DTask and its peers, same workload, same machine, same run."""

from bench.suite.cli import main

if __name__ == "__main__":
    main()
