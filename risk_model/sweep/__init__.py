"""Sweep harness: model zoo, synthetic tasks, labelled trainer and a resumable runner (DESIGN §7).

Kept import-light; import the submodules (``zoo``, ``tasks``, ``trainer``, ``spec``, ``runner``)
where they are needed.
"""
