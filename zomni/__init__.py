"""zomni: serve LLMs and diffusion models from cooperating processes over ZeroMQ."""

from zomni.proto import DiffusionParams, ImageParams, SamplingParams

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "DiffusionParams", "ImageParams", "RequestOutput",
           "CompletionOutput", "ImageGenerationOutput"]

_API = ("LLM", "AsyncLLM", "RequestOutput", "CompletionOutput", "ImageGenerationOutput")


def __getattr__(name: str):
    # The Python API lives in the frontend; import it on first use to keep `import zomni` light.
    if name in _API:
        from zomni.frontend import api

        return getattr(api, name)
    raise AttributeError(name)
