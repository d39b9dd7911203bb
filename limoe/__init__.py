"""limoe: LIMoE, the Language-Image Mixture of Experts, in PyTorch."""

__version__ = "0.1.0"


def create_model(*args, **kwargs):
    """See :func:`limoe.models.create_model` (imported lazily so ``limoe.moe`` stays light)."""
    from limoe.models import create_model as _create_model

    return _create_model(*args, **kwargs)
