"""Viz: dataset statistics (``stats``) and the figures drawn from them and from runs (``plots``)."""
