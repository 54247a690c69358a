"""The command line: thin typer commands over the library API, no logic of its own."""
