"""limoe: LIMoE, the Language-Image Mixture of Experts, in PyTorch."""

__version__ = "0.1.0"


def create_model(*args, **kwargs):
    """See :func:`limoe.factory.create_model` (imported lazily so ``limoe.moe`` stays light)."""
    from limoe.factory import create_model as _create_model

    return _create_model(*args, **kwargs)


def create_model_and_transforms(*args, **kwargs):
    """See :func:`limoe.factory.create_model_and_transforms`: ``(model, preprocess_train,
    preprocess_val)`` from a config name, a checkpoint or an export folder."""
    from limoe.factory import create_model_and_transforms as _create

    return _create(*args, **kwargs)


def get_tokenizer(*args, **kwargs):
    """See :func:`limoe.factory.get_tokenizer`."""
    from limoe.factory import get_tokenizer as _get_tokenizer

    return _get_tokenizer(*args, **kwargs)
