"""`python -m dtask.ctl` runs dtaskctl (for when the console script is not installed)."""

from . import main

if __name__ == "__main__":
    main()
