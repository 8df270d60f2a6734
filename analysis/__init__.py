"""Stage 3: curves and the double-win table, mask statistics, robustness evaluation, loss landscapes.

Each module runs as a script from the repository root (``python analysis/plot_curves.py ...``)
and exposes ``main(argv)``.
"""
