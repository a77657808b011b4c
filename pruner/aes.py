"""The paper's Accuracy-Efficiency Score, with accuracy drops penalised as its formula says.

    dL = (L_base - L) / L_base,  dA = (A - A_base) / A_base
    AES = alpha * dL + beta * dA        if dA >= 0
        = alpha * dL - gamma * |dA|     otherwise        (alpha = 1, beta = 3, gamma = 5)

The first version of the paper's Table 2 reports dL + 3 |dA| for every row, crediting models that
lost accuracy; this implementation follows the formula (drops cost gamma = 5 per unit).
"""
from __future__ import annotations

AES_FORMULA = "AES = dL + 3*dA if dA >= 0 else dL - 5*|dA| (dL, dA relative to the base; accuracy drops penalised)"


def accuracy_efficiency_score(base_length: float, base_accuracy: float, length: float, accuracy: float, *,
                              alpha: float = 1.0, beta: float = 3.0, gamma: float = 5.0) -> float:
    if base_length <= 0:
        raise ValueError(f"base length must be positive, got {base_length}")
    if base_accuracy <= 0:
        raise ValueError(f"base accuracy must be positive for a relative accuracy change, got {base_accuracy}")
    d_length = (base_length - length) / base_length
    d_accuracy = (accuracy - base_accuracy) / base_accuracy
    if d_accuracy >= 0:
        return alpha * d_length + beta * d_accuracy
    return alpha * d_length - gamma * abs(d_accuracy)


def waste_removed(base_length: float, length: float, min_length: float) -> float | None:
    """Share of the removable tokens (above the shortest correct trace) that a model removed."""
    removable = base_length - min_length
    return None if removable <= 0 else (base_length - length) / removable
