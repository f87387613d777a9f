"""``mtgrad compare``: built-in problems, the training runner, tables and plots.

``problems`` defines the :class:`Problem` record and the suite (the
two-objective toy, GradNorm's regression, MultiMNIST, optionally QM9);
``runner`` trains one method on one problem in one compiled program;
``report`` computes Delta_m% and prints tables; ``plots`` draws the figures;
``progress`` is the stderr progress bar.
"""
