"""``Preprocess``: what turns an image file and a caption into model input, as a datamodule
applies it (image size, normalisation, training augmentation, the background transparent
pixels are composited on, the tokenizer's context length). Exports record it, and
``create_model_and_transforms`` and ``get_tokenizer`` rebuild the transforms and the tokenizer
from it, so a loaded model sees what it was trained on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

from hydra.utils import get_object
from open_clip.tokenizer import SimpleTokenizer
from torchvision.transforms import Compose

from limoe.data.images import WHITE, to_rgb
from limoe.data.transforms import build_transform


@dataclass(frozen=True)
class Preprocess:
    image_size: int
    context_length: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    background: tuple[int, ...] = WHITE
    augment: Mapping = field(default_factory=dict)  # open_clip's AugmentationCfg keys

    def __post_init__(self) -> None:
        for name in ("mean", "std", "background"):  # tuples, whatever a config held
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "augment", dict(self.augment or {}))

    @classmethod
    def of_data(cls, data: Mapping) -> Preprocess:
        """The preprocessing of a data config (a datamodule's ``_target_`` and arguments),
        without building the datamodule: its class says what it applies."""
        return get_object(data["_target_"]).preprocess_of(data)

    @classmethod
    def from_dict(cls, values: Mapping) -> Preprocess:
        return cls(**{key: values[key] for key in cls.__dataclass_fields__ if key in values})

    def as_dict(self) -> dict:
        """Plain lists and dicts, for JSON."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def transforms(self) -> tuple[Callable, Callable]:
        """``(preprocess_train, preprocess_val)``: PIL image -> tensor, transparent pixels
        composited on the background first."""
        rgb = functools.partial(to_rgb, background=self.background)
        train = build_transform(self.image_size, True, self.mean, self.std, self.augment)
        val = build_transform(self.image_size, False, self.mean, self.std)
        return Compose([rgb, train]), Compose([rgb, val])

    def tokenizer(self) -> SimpleTokenizer:
        """open_clip's tokenizer with the context length the model reads."""
        return SimpleTokenizer(context_length=self.context_length)
