"""``python -m takfl.wire_vectors --out docs/protocol``."""

from takfl.wire_vectors import main

main()
