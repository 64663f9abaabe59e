"""``python -m risk_model.sweep SPEC --out DIR [--workers N] [--backend dask --scheduler ADDR]``."""
from .cli import main

main()
