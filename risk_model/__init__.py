"""Everything that learns, stores and serves divergence risk (corpus, predictor, tracking, sweep, CLI).

Kept import-light: submodules import heavy libraries where they are used.
"""
__version__ = "0.1.0"
