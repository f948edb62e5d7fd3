"""Benchmarks of the platform's services (`gradalign bench <name>`), one module per benchmark
(e.g. gradalign_tools.bench.scoring): each runs its baseline in the same process, on the same inputs,
and prints ratios against it.
"""
