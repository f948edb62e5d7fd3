"""Loading causal LMs and tokenizers from local Hugging Face directories, and saving them atomically.

Every loader takes any local HF checkpoint (config.json + weights + tokenizer files);
nothing is ever downloaded. A path that does not exist raises NotFoundError, a
directory that is not a model raises InvalidInputError, each naming the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gradalign_common.artifacts import atomic_path
from gradalign_common.errors import InvalidInputError, NotFoundError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype name to load a model with on `device`: "auto" is bfloat16 on CUDA and float32
    elsewhere (CPU); any other value is returned as given (an explicit choice wins)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).split(":", 1)[0] == "cuda" else "float32"


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidInputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def dtype_on(name: str, device: str) -> torch.dtype:
    """The torch dtype a dtype name means on `device` ("auto" resolved by resolve_dtype); InvalidInputError if unknown."""
    return parse_dtype(resolve_dtype(name, device))


def check_model_dir(path: str | Path) -> Path:
    """Return the resolved path of a local HF model directory or raise naming what is wrong."""
    p = Path(path).expanduser()
    if not str(path):
        raise InvalidInputError("no model path given")
    if not p.exists():
        raise NotFoundError(f"model path does not exist: {p}")
    if not p.is_dir():
        raise InvalidInputError(f"model path is not a directory: {p}")
    if not (p / "config.json").is_file():
        raise InvalidInputError(f"not a Hugging Face model directory (no config.json): {p}")
    if not any((p / name).is_file() for name in _WEIGHT_FILES):
        raise InvalidInputError(f"not a Hugging Face model directory (no model weights): {p}")
    return p.resolve()


def checkpoint_fingerprint(path: str | Path) -> tuple:
    """Identity of a checkpoint on disk: path plus the mtimes/sizes of its config and weights."""
    p = check_model_dir(path)
    parts: list = [str(p)]
    for name in ("config.json", *_WEIGHT_FILES):
        f = p / name
        if f.is_file():
            st = f.stat()
            parts.append((name, st.st_mtime_ns, st.st_size))
    return tuple(parts)


_TOKENIZER_PROBE = "Hello, world 12 + 3 = 15\n\tx^2 \u222b \u00e9"


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, encoding exactly as its tokenizer.json says.

    AutoTokenizer may pick a model-specific class (e.g. Qwen2Tokenizer for any qwen2
    config) that rebuilds the pipeline and tokenizes differently from the saved file (the
    tiny model's character tokenizer would lose its spaces). When that happens the
    generic fast tokenizer, which uses tokenizer.json as it is, is loaded instead.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        file = p / "tokenizer.json"
        if file.is_file():
            from tokenizers import Tokenizer

            exact = Tokenizer.from_file(str(file)).encode(_TOKENIZER_PROBE, add_special_tokens=False).ids
            if tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"] != exact:
                tokenizer = PreTrainedTokenizerFast.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot load a tokenizer from {p}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(path: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32"):
    """Load a causal LM for inference or training; eval mode, on `device` ("auto" dtype: resolve_dtype)."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    torch_dtype = dtype_on(dtype, device) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInputError(f"cannot load a causal LM from {p}: {exc}") from None
    return model.to(device).eval()


def save_checkpoint(model, tokenizer, dest: str | Path) -> Path:
    """Write model + tokenizer as a HF directory; it appears at dest only once complete."""
    with atomic_path(dest) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():  # make the directory durable before it is renamed into place
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    return Path(dest)


def configure_torch_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
