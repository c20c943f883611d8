"""Reporting: console lines, tables, TensorBoard reading, LR plots, sweep summaries."""
