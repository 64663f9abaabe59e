"""Sweep harness: architectures, synthetic tasks, labelled trainer, learning-rate ladders and a
resumable runner (``datasets/README.md`` describes the corpora it made).

Kept import-light; import the submodules (``archs``, ``tasks``, ``trainer``, ``spec``, ``ladder``,
``runner``, ``model_table``) where they are needed. The model zoo is ``risk_model.zoo``.
"""
