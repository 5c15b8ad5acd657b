"""Developer tools run as modules: `python -m glmserve.tools.<name>`."""
