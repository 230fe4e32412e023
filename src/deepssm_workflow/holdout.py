"""Which real training subjects validation holds out, drawn once and used alike by the
augmentation (which fits its shape model without them) and the training (which fits its PCA
basis without them and validates on them and on the samples made from them).

Kept free of torch so that the augmentation step does not import it.
"""

from __future__ import annotations

import numpy as np


def validation_subjects(n_real: int, val_fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of the round(val_fraction * n_real) real subjects held out for validation
    (at least 1, at most n_real - 1); deterministic in `seed`."""
    if n_real < 2:
        raise ValueError(f"need at least 2 real subjects to split, got {n_real}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = min(max(int(round(val_fraction * n_real)), 1), n_real - 1)
    return np.sort(np.random.default_rng(seed).choice(n_real, size=n_val, replace=False))


def split_by_source(n_real: int, source_index, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices into [real subjects 0..n_real-1, generated samples ...].

    `source_index[j]` is the real subject (0..n_real-1) that generated sample j was made
    from (KDE augmentation warps that subject's image). The `validation_subjects` are held
    out, and every generated sample follows its source subject into the same split. No
    subject's anatomy is therefore on both sides, unlike the reference implementation, which
    split real and augmented samples together and so validated on warped copies of training
    images. Deterministic in `seed`; both arrays are sorted.
    """
    source = np.asarray(source_index, dtype=np.int64).reshape(-1)
    val_real = validation_subjects(n_real, val_fraction, seed)
    if source.size and (source.min() < 0 or source.max() >= n_real):
        raise ValueError(f"source_index must name real subjects 0..{n_real - 1}")
    is_val = np.zeros(n_real + source.size, dtype=bool)
    is_val[val_real] = True
    is_val[n_real:] = np.isin(source, val_real)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
