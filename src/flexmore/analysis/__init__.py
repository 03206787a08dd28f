"""Rank analysis on results tables: data.py (input), peaks.py (Figure 3), regression.py, selection.py,
params.py (parameter accounting), plots.py and report.py."""
