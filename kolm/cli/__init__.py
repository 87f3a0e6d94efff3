"""The `kolm` command line, the demo that runs the whole line, and run reports."""
