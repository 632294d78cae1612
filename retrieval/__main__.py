"""`python -m retrieval` (and `torchrun -m retrieval`) run the CLI."""
from .cli import main

main()
