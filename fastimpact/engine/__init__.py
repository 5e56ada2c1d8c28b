"""The registration engine: the driver (:func:`register`) and its pieces, one module each.

    inputs (fastimpact.inputs) -> levels (pyramid, level data, support regions) -> initial transform
    -> per stage and level: term (the factory), cost function, estimation (ASGD's parameters, step
    guard), host or device loop -> report -> result (fastimpact.result)
"""

from .driver import register

__all__ = ["register"]
