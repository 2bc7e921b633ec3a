"""zomni: serve LLMs and diffusion models from cooperating processes over ZeroMQ."""

from zomni.proto import SamplingParams

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # The Python API lives in the frontend; import it on first use to keep `import zomni` light.
    if name in ("LLM", "AsyncLLM", "RequestOutput", "CompletionOutput"):
        from zomni.frontend import api

        return getattr(api, name)
    raise AttributeError(name)
