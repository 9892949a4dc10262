"""Entry points: each parses its command line, builds its typed config and runs one function of the packages below."""
