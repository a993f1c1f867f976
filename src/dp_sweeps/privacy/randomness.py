"""The mechanism's secret randomness: where the DP-SGD noise, the Poisson sampling
coins, the DP data-normalisation noise, the classical mechanisms' noise, and a private
search's number of trials and score noise come from.

Guarantee: every DP proof assumes the attacker does not know these random draws. An
attacker who can regenerate the noise and the batches subtracts them from the released
weights and decides membership with certainty. So, by default, each stream is seeded
from fresh OS entropy (:func:`secrets.randbits`), separately on every run, every
stream and every rank, and the seeds are never written to ``result.json``, the config,
the log or the metrics. ``seed`` fixes only what is *outside* the mechanism: initial
weights, the validation split, augmentation and the non-private data order.

A checkpoint stores the generators' states so that a resumed run continues each stream
instead of drawing it again: a checkpoint is therefore a secret, like the data.

``privacy.noise_seed`` (debugging only) derives every stream from that number instead,
so that a run can be replayed bit for bit. Such a run's ε is no guarantee (anyone who
reads the config can replay the noise): it is marked ``epsilon_valid: false``.

Secure sampling against floating-point attacks (Mironov 2012; Jin et al. 2022) needs a
cryptographically secure generator (Opacus's ``secure_mode``, through torchcsprng);
torchcsprng has no release for this torch, so ``privacy.secure_mode=true`` is refused
before training (:func:`secure_mode_unavailable`). Fresh OS-entropy seeds for torch's
generators stop replay, not those attacks (docs/privacy.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import secrets
from typing import Optional

import numpy as np
import torch

# The streams of the mechanism; each gets its own generator. A private search draws its
# number of trials from "trial_count", its trials' hyperparameters from "trial_params" and
# its validation scores' noise from "score" (dp_sweeps.privacy.tuning, .noisy_score).
STREAMS = ("noise", "sampler", "data_norm", "classical", "trial_count", "trial_params", "score")


def stream_seed(stream: str, *, noise_seed: Optional[int], rank: int = 0) -> int:
    """A 63-bit seed for ``stream`` on ``rank``: fresh OS entropy, or (``noise_seed`` set,
    debugging only) a hash of (noise_seed, stream, rank)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown randomness stream {stream!r}")
    if noise_seed is None:
        return secrets.randbits(63)
    digest = hashlib.sha256(f"dp_sweeps/{int(noise_seed)}/{stream}/{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def mechanism_generator(stream: str, *, noise_seed: Optional[int], rank: int = 0,
                        device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for ``stream`` seeded as :func:`stream_seed` says."""
    return torch.Generator(device=device).manual_seed(stream_seed(stream, noise_seed=noise_seed, rank=rank))


def mechanism_random_state(stream: str, *, noise_seed: Optional[int], rank: int = 0) -> np.random.RandomState:
    """A NumPy ``RandomState`` (what diffprivlib and scikit-learn take) for ``stream``.
    Never ``None``: diffprivlib would then draw from NumPy's global state, which
    ``seed`` fixes. Seeded with all 63 bits (two words): a 32-bit seed could be searched
    exhaustively."""
    value = stream_seed(stream, noise_seed=noise_seed, rank=rank)
    return np.random.RandomState(np.array([value & 0xFFFFFFFF, value >> 32], dtype=np.uint32))


def secure_mode_unavailable() -> Optional[str]:
    """Why ``privacy.secure_mode=true`` cannot run here (None if it can)."""
    if importlib.util.find_spec("torchcsprng") is None:
        return (f"privacy.secure_mode=true needs torchcsprng (Opacus's secure generator), which has no "
                f"release for torch {torch.__version__.split('+')[0]}; the default mode already draws the "
                f"noise and the sampling from fresh OS entropy (docs/privacy.md)")
    return None
