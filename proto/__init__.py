"""Wire protocol: message structs, framing, errors, configs, and the engine client.

Importing this package never imports torch; a custom frontend needs nothing else.
"""

from .codec import SCHEMA_HASH, decode, encode
from .config import EngineConfig, WorkerConfig
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
    CachedRequestData,
    Empty,
    EngineDeadMsg,
    EngineOutput,
    EngineOutputs,
    EngineRequest,
    ErrorMsg,
    FinishReason,
    Hello,
    ModelInfo,
    ModelRunnerOutput,
    MsgType,
    NewRequestData,
    Ready,
    SchedulerOutput,
    Shutdown,
    Stats,
    TokenLogprobs,
    WorkerReady,
)
from .sampling import SamplingParams

__all__ = [
    "PROTOCOL_VERSION", "SCHEMA_HASH", "Abort", "CachedRequestData", "ContextLengthExceeded",
    "Empty", "EngineConfig", "EngineDead", "EngineDeadMsg", "EngineOutput", "EngineOutputs",
    "EngineOverloaded", "EngineRequest", "ErrorMsg", "FinishReason", "Hello", "InvalidRequest",
    "ModelInfo", "ModelRunnerOutput", "MsgType", "NewRequestData", "ProtocolMismatch", "Ready",
    "SamplingParams", "SchedulerOutput", "Shutdown", "Stats", "TokenLogprobs", "WorkerConfig",
    "WorkerReady", "ZomniError", "decode", "encode",
]
