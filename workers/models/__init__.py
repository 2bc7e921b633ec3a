"""Model definitions, and the registry that maps an HF `architectures[0]` string to a class."""

from __future__ import annotations

from torch import nn

from zomni.workers.models.decoder import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from zomni.workers.models.dllm import DreamModel, LLaDAModelLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    # masked-diffusion LMs (bidirectional; their configs are read by `config_from_dict`)
    "LLaDAModelLM": LLaDAModelLM,
    "DreamModel": DreamModel,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         f"{', '.join(MODEL_REGISTRY)}") from None
