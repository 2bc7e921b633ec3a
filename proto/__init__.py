"""Wire protocol: message structs, framing, errors, configs, and the engine client.

Importing this package never imports torch; a custom frontend needs nothing else.
"""

from .codec import SCHEMA_HASH, decode, encode
from .config import EngineConfig, WorkerConfig
from .diffusion import DiffusionParams
from .errors import (
    ContextLengthExceeded,
    EngineDead,
    EngineOverloaded,
    InvalidRequest,
    ProtocolMismatch,
    ZomniError,
)
from .messages import (
    PROTOCOL_VERSION,
    Abort,
    ArrayRef,
    CachedRequestData,
    DenoiseRequestData,
    DenoiseRunnerOutput,
    DenoiseSchedulerOutput,
    DiffusionLMModelInfo,
    DiffusionLMRequestData,
    DiffusionLMRunnerInfo,
    DiffusionLMRunnerOutput,
    DiffusionLMSchedulerOutput,
    DiffusionLMStats,
    Empty,
    EngineDeadMsg,
    EngineOutput,
    EngineOutputs,
    EngineRequest,
    ErrorMsg,
    FinishReason,
    Hello,
    ImageModelInfo,
    ImageOutput,
    ImageRequest,
    ImageRunnerInfo,
    ImageStats,
    ModelInfo,
    ModelKind,
    ModelRunnerOutput,
    MsgType,
    NewRequestData,
    Ready,
    SchedulerOutput,
    Shutdown,
    Stats,
    TokenLogprobs,
    TokenModelInfo,
    TokenRunnerInfo,
    TokenStats,
    WorkerError,
    WorkerReady,
)
from .sampling import ImageParams, SamplingParams, StepCacheParams

__all__ = [
    "PROTOCOL_VERSION", "SCHEMA_HASH", "Abort", "ArrayRef", "CachedRequestData",
    "ContextLengthExceeded", "DenoiseRequestData", "DenoiseRunnerOutput", "DenoiseSchedulerOutput",
    "DiffusionLMModelInfo", "DiffusionLMRequestData", "DiffusionLMRunnerInfo",
    "DiffusionLMRunnerOutput", "DiffusionLMSchedulerOutput", "DiffusionLMStats", "DiffusionParams",
    "Empty", "EngineConfig", "EngineDead", "EngineDeadMsg", "EngineOutput",
    "EngineOutputs", "EngineOverloaded", "EngineRequest", "ErrorMsg", "FinishReason", "Hello",
    "ImageModelInfo", "ImageOutput", "ImageParams", "ImageRequest", "ImageRunnerInfo",
    "ImageStats", "InvalidRequest", "ModelInfo", "ModelKind", "ModelRunnerOutput", "MsgType",
    "NewRequestData", "ProtocolMismatch", "Ready", "SamplingParams", "SchedulerOutput", "Shutdown",
    "Stats", "StepCacheParams", "TokenLogprobs", "TokenModelInfo", "TokenRunnerInfo", "TokenStats",
    "WorkerConfig", "WorkerError", "WorkerReady", "ZomniError", "decode", "encode",
]
