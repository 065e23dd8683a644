"""Reproductions from outside the app: ``pwff reproduce``, tables, plots and the ``pwff`` CLI."""
