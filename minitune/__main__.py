"""`python -m minitune ...` and the `minitune` script: see minitune/cli.py."""

from .cli import main

if __name__ == "__main__":
    main()
