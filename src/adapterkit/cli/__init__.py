"""The `adapterkit` command line (see main.py)."""
