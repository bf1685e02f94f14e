"""One module per benchmark of recipes/bench.py: each has HELP, add_arguments(parser) and run(args)."""
