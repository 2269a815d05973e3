"""Networks. ``MLP`` is the original notebook's "generalised MLP", in the spirit of sklearn's ``MLPClassifier``;
``CNN`` a small convolutional network for ``[C, H, W]`` images.

Each network records its constructor arguments in ``init_args``, so that a checkpoint can rebuild it
(:func:`net_spec`, :func:`build_net`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from noisy_lightning.checks import check_choice, check_float, check_int

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


class MLP(nn.Module):
    """A multilayer perceptron ``in_features -> hidden_sizes... -> num_classes`` that returns logits.

    Each hidden layer is ``Linear -> [BatchNorm1d] -> activation -> [Dropout]``. ``hidden_sizes=[]`` gives
    multinomial logistic regression. Inputs of any shape ``[B, ...]`` are flattened to ``[B, in_features]``.

    Args:
        in_features: size of a flattened input (784 for 28 x 28 digits).
        hidden_sizes: widths of the hidden layers, any depth including none; each must be > 0.
        num_classes: number of output logits (>= 2).
        activation: one of ``relu``, ``leaky_relu``, ``gelu``, ``silu``, ``elu``, ``tanh``, ``sigmoid``.
        dropout: dropout probability after each hidden activation, in ``[0, 1)``. The default 0.5 is the measured
            recipe (it keeps the network from memorising wrong labels); the paper's plain MLP has 0.
        batch_norm: insert ``BatchNorm1d`` after each hidden linear layer.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden_sizes: Sequence[int] = (500, 300),
        num_classes: int = 10,
        activation: str = "relu",
        dropout: float = 0.5,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        hidden_sizes = list(hidden_sizes)
        check_int("in_features", in_features, 1)
        for size in hidden_sizes:
            check_int("each of hidden_sizes", size, 1)
        check_int("num_classes", num_classes, 2)
        check_choice("activation", activation, ACTIVATIONS)
        check_float("dropout", dropout, 0.0, 1.0, open_maximum=True)
        self.init_args = {
            "in_features": in_features,
            "hidden_sizes": hidden_sizes,
            "num_classes": num_classes,
            "activation": activation,
            "dropout": dropout,
            "batch_norm": batch_norm,
        }
        self.in_features = in_features
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.reshape(x.shape[0], -1))


class CNN(nn.Module):
    """A small convolutional network for ``[B, C, H, W]`` images (flat inputs are reshaped with ``image_shape``).

    Two blocks ``Conv 3x3 -> BatchNorm -> ReLU -> Conv 3x3 -> BatchNorm -> ReLU -> MaxPool 2``, with ``width`` and
    ``2 * width`` channels, then global average pooling, dropout and a linear layer to ``num_classes`` logits. It
    works for any image size of at least 4 x 4.

    Args:
        in_channels: channels of the input images (1 for greyscale, 3 for RGB).
        num_classes: number of output logits (>= 2).
        width: channels of the first block (>= 1).
        dropout: dropout probability before the last layer, in ``[0, 1)``.
        image_shape: ``(C, H, W)`` used to un-flatten ``[B, C*H*W]`` inputs; ``None`` needs 4-D (or 3-D, one
            channel) inputs.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        dropout: float = 0.3,
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("num_classes", num_classes, 2)
        check_int("width", width, 1)
        check_float("dropout", dropout, 0.0, 1.0, open_maximum=True)
        self.image_shape = None if image_shape is None else tuple(image_shape)
        if self.image_shape is not None and (len(self.image_shape) != 3 or self.image_shape[0] != in_channels):
            raise ValueError(f"image_shape must be (in_channels={in_channels}, H, W), got {image_shape!r}")
        self.init_args = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "width": width,
            "dropout": dropout,
            "image_shape": None if image_shape is None else list(image_shape),
        }
        self.in_channels = in_channels
        self.num_classes = num_classes

        def block(inputs: int, outputs: int) -> list[nn.Module]:
            layers: list[nn.Module] = []
            for channels_in in (inputs, outputs):
                layers += [nn.Conv2d(channels_in, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs)]
                layers.append(nn.ReLU(inplace=True))
            return [*layers, nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(in_channels, width), *block(width, 2 * width))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2 and self.image_shape is not None:
            x = x.reshape(x.shape[0], *self.image_shape)
        elif x.ndim == 3 and self.in_channels == 1:
            x = x.unsqueeze(1)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"CNN(in_channels={self.in_channels}) needs input of shape [B, {self.in_channels}, H, W]"
                f"{'' if self.image_shape is None else ' or flat [B, C*H*W]'}; got {tuple(x.shape)}"
            )
        return self.head(self.features(x).mean(dim=(2, 3), keepdim=True))


def net_spec(net: nn.Module) -> dict[str, Any] | None:
    """``{"class_path": ..., "init_args": ...}`` for a network that records its ``init_args``, else ``None``."""
    init_args = getattr(net, "init_args", None)
    if not isinstance(init_args, dict):
        return None
    return {"class_path": f"{type(net).__module__}.{type(net).__qualname__}", "init_args": dict(init_args)}


def build_net(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a network from :func:`net_spec`'s description (e.g. read back from a checkpoint).

    Only classes from ``noisy_lightning``, ``torch`` or a module already imported are built: a checkpoint cannot
    make this import code that the program has not loaded itself.
    """
    class_path = spec.get("class_path") if isinstance(spec, dict) else None
    if not isinstance(class_path, str) or "." not in class_path:
        raise ValueError(f"net must be an nn.Module or a {{'class_path': ..., 'init_args': ...}} dict, got {spec!r}")
    module_name, _, class_name = class_path.rpartition(".")
    trusted = module_name.split(".")[0] in ("noisy_lightning", "torch") or module_name in sys.modules
    if not trusted:
        raise ValueError(
            f"net class {class_path!r} is from a module that is not imported; import it first, or pass net=... "
            "to load_from_checkpoint"
        )
    net_class = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(net_class, type) and issubclass(net_class, nn.Module)):
        raise ValueError(f"net class_path {class_path!r} does not name an nn.Module class")
    return net_class(**spec.get("init_args", {}))
