"""Everything around the four services: the `gradalign` command line (cli.py), the local 4-process
stack (stack.py), the demo (demo.py), dataset commands (data_cli.py) and the benchmarks (bench/).

The services never import this package; it imports them (to run them in-process or as processes).
"""
