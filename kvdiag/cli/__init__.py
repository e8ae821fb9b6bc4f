"""kvdiag command line: one module per subcommand."""
