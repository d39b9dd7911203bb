"""Analysis of finished runs: the arm comparison (``limoe-compare``)."""
