"""Built-in methods. Adding one: a file here and one import line below."""

from uda_cli.methods import source_only  # noqa: F401
