"""Counter-based random numbers, written once for every backend (NumPy reference, Numba CPU, CUDA).

The value for draw ``i`` of call ``c`` under key ``k`` is a pure function of (k, c, i): the
SplitMix64 output function (Steele, Lea & Flood 2014) applied to the Weyl sequence point
``k + G (c 2^32 + i + 1)`` (G = 0x9E3779B97F4A7C15, arithmetic mod 2^64). No state is carried
between draws, so every GPU thread draws its own sample and a CPU and a GPU run with one seed
draw the same points in the same order.

A uniform index in [0, n) is Lemire's multiply-shift of the top 32 bits, ``(u32 * n) >> 32``
(bias below n / 2^32, i.e. < 1e-3 for the largest images; n must be < 2^32).

All constants are uint64 scalars so that Numba keeps the arithmetic in unsigned 64-bit integers
(an int64 operand would promote the expression to float64).
"""

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
S30 = np.uint64(30)
S27 = np.uint64(27)
S31 = np.uint64(31)
S32 = np.uint64(32)
ONE = np.uint64(1)

#: Largest number of candidates an index draw supports.
MAX_CANDIDATES = 2**32 - 1


def draw_index(key, counter, i, n):
    """Uniform index in [0, n) of draw ``i`` of call ``counter`` (all uint64; n < 2^32).

    Self-contained (no calls to other Python functions) so that every backend compiles it as is.
    """
    z = key + GOLDEN * ((counter << S32) + i + ONE)
    z = (z ^ (z >> S30)) * MIX1  # SplitMix64 output function
    z = (z ^ (z >> S27)) * MIX2
    z = z ^ (z >> S31)
    return ((z >> S32) * n) >> S32
