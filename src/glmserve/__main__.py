"""`python -m glmserve` runs the CLI."""

from glmserve.cli import main

if __name__ == "__main__":
    main()
