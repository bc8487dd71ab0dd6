"""See the package docstring of kvstream for where this fits in the data path."""
