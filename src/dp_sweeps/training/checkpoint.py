"""Checkpoints that make a resumed DP run the same run, never a replay.

Opacus's ``PrivacyEngine.save_checkpoint`` stores model, optimizer and accountant but
no random-generator state: a run resumed with its fixed seed draws the *same* noise
and the same Poisson batches again, and reused noise voids the guarantee. Here a
checkpoint carries every generator in play (torch's global one, the noise generator,
the Poisson sampler's, the augmentation one, Python's and NumPy's), so resuming
continues each stream where it stopped. It also records the privacy settings, and a
checkpoint whose settings differ from the run's config is refused.

Files are written atomically (write, then rename) and load with
``torch.load(weights_only=True)``: tensors, numbers, strings and containers only.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from dp_sweeps.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.pt"
# What must match between a checkpoint and the config that resumes it.
PRIVACY_KEYS = ("model", "private", "mechanism", "noise_multiplier", "sample_rate", "max_grad_norm", "accountant",
                "delta", "batch_size", "poisson_sampling", "num_train", "seed", "prior_releases")


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def generator_states(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    np_state = np.random.get_state()
    states = {f"generator/{name}": g.get_state() for name, g in generators.items()}
    states.update({
        "torch": torch.get_rng_state(),
        "python": repr(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    })
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_generator_states(states: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    for name, g in generators.items():
        g.set_state(states[f"generator/{name}"])
    torch.set_rng_state(states["torch"])
    import ast

    version, internal, gauss = ast.literal_eval(states["python"])
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def check_privacy_settings(saved: Mapping[str, Any], current: Mapping[str, Any], *, path: Path) -> None:
    """Refuse a checkpoint written under other privacy settings than the config's."""
    for key in PRIVACY_KEYS:
        a, b = saved.get(key), current.get(key)
        same = (a == b) or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12))
        if not same:
            raise ConfigError(f"checkpoint {path} was written with {key}={a!r}, but the config gives {key}={b!r}: "
                              f"refusing to resume")


def maybe_load(run_dir: Optional[str | os.PathLike], *, resume: bool) -> Optional[dict[str, Any]]:
    if not resume or run_dir is None:
        return None
    path = checkpoint_path(run_dir)
    return load_checkpoint(path) if path.is_file() else None
