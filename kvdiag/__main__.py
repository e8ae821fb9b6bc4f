"""`python -m kvdiag` = the `kvdiag` command."""

from kvdiag.cli import main

main()
