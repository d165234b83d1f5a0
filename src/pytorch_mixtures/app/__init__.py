"""``pytorch-mixtures demo | train | bench``: the command-line application; the library never
imports this package."""

__all__: list[str] = []
