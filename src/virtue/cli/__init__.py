"""The `virtue` command line: thin shells over library calls."""
