"""Networks. ``MLP`` is the original notebook's "generalised MLP", in the spirit of sklearn's ``MLPClassifier``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

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
        dropout: dropout probability after each hidden activation, in ``[0, 1)``.
        batch_norm: insert ``BatchNorm1d`` after each hidden linear layer.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden_sizes: Sequence[int] = (500, 300),
        num_classes: int = 10,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        hidden_sizes = list(hidden_sizes)
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
        for size in hidden_sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ValueError(f"hidden_sizes must hold positive integers, got {hidden_sizes!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
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
