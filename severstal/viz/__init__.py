"""Viz: dataset statistics (``stats``) and the drawing of every figure (``draw``): the only stage that draws."""
