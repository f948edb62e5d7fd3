"""Keep one checkpoint loaded in a worker and swap weights in place when a request names another.

Workers stay up between rounds with their model loaded (ARCHITECTURE.md). A request
names a checkpoint directory; when its fingerprint (path + weight file mtimes) equals
the loaded one nothing is reloaded. Otherwise, when the architecture is the same, only
the weights are copied into the existing module; a different architecture is loaded afresh.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from gradalign_common.modeling import checkpoint_fingerprint, load_model, load_tokenizer


class ModelCache:
    def __init__(self, device: str = "cpu", dtype: str = "float32"):
        self.device = device
        self.dtype = dtype
        self._lock = threading.Lock()
        self._fingerprint: tuple | None = None
        self.model = None
        self.tokenizer = None
        self.loads = 0  # full loads
        self.swaps = 0  # in-place weight swaps

    @property
    def lock(self) -> threading.Lock:
        """Held by a request while it uses the model, so a concurrent swap cannot interleave."""
        return self._lock

    def clear(self) -> None:
        self.model = self.tokenizer = self._fingerprint = None

    def get(self, checkpoint: str | Path):
        """Return (model, tokenizer) for checkpoint; call with `lock` held."""
        fingerprint = checkpoint_fingerprint(checkpoint)
        if fingerprint == self._fingerprint:
            return self.model, self.tokenizer
        new_model = load_model(checkpoint, device=self.device, dtype=self.dtype)
        tokenizer = load_tokenizer(checkpoint)
        if self.model is not None and same_architecture(self.model, new_model):
            with torch.no_grad():
                self.model.load_state_dict(new_model.state_dict())
            self.model.generation_config = new_model.generation_config
            del new_model
            self.swaps += 1
        else:
            self.model = new_model
            self.loads += 1
        self.tokenizer = tokenizer
        self._fingerprint = fingerprint
        return self.model, self.tokenizer


# config keys that differ between checkpoints of one architecture (where it was saved, by which version)
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}


def same_architecture(a, b) -> bool:
    """Same class and config apart from where it was saved: the weights can be copied in place."""
    if type(a) is not type(b):
        return False
    strip = lambda m: {k: v for k, v in m.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}  # noqa: E731
    return strip(a) == strip(b)
