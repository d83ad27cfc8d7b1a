"""The ``riemod`` command line: one file per subcommand, thin over the library."""
