"""The benchmarks behind bench.py; each module owns one subcommand or two (see bench.py --help)."""
