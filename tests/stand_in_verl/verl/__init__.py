"""A stand-in for verl 0.9.1 (tests/stand_in_verl/README.md); nothing of the real verl."""
