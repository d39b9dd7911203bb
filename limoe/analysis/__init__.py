"""Analysis of trained models and finished runs: which experts take which tokens
(``routing``: collection and tables; ``plots``; ``report``; ``analyze``: the ``limoe-analyze``
command) and the arm comparison (``compare``: ``limoe-compare``)."""
