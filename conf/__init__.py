"""limoe's Hydra configs. In the repository they live in ``conf/``; installed, they are the
package ``limoe.conf`` (``setup.py`` maps one to the other), which ``limoe.config`` reads."""
