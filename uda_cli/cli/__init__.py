"""The command-line interface: a Typer app with one thin module per command."""
