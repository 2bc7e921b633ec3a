"""What every process needs to know about a model directory, read from its JSON files only."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InvalidRequest
from .messages import ModelInfo

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM")


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def read_model_info(model_dir: str, max_model_len: int | None = None, dtype: str = "",
                    tensor_parallel_size: int = 1) -> ModelInfo:
    """Architecture, context length and EOS ids of the HF-format model in `model_dir`.

    EOS ids come from generation_config.json when present (chat models list several there),
    else from config.json.
    """
    path = Path(model_dir)
    cfg = json.loads((path / "config.json").read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InvalidRequest(f"unsupported architecture {arch}; zomni serves "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}", param="model")
    eos = _ids(cfg.get("eos_token_id"))
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        eos = _ids(json.loads(gen_path.read_text()).get("eos_token_id")) or eos
    limit = int(cfg.get("max_position_embeddings", 2048))
    if max_model_len is not None:
        if not 2 <= max_model_len <= limit:
            raise InvalidRequest(f"max_model_len must be in [2, {limit}] (the model's "
                                 f"max_position_embeddings), got {max_model_len}",
                                 param="max_model_len")
        limit = max_model_len
    return ModelInfo(model=str(model_dir), architecture=arch, max_model_len=limit,
                     vocab_size=int(cfg["vocab_size"]), eos_token_ids=eos, dtype=dtype,
                     tensor_parallel_size=tensor_parallel_size)
