"""ChatLoop: pipeline-parallel LLM inference over torch.distributed.rpc.

The public surface: :class:`ChatLoop` (start a cluster, generate, stream, chat, score),
:class:`SamplingParams`, :func:`load_config` and the typed :class:`ChatLoopConfig`.
"""

__version__ = "0.1.0"

from .api import ChatLoop, Completion, Score, load_config
from .config import ChatLoopConfig
from .engine import SamplingParams

__all__ = ["ChatLoop", "ChatLoopConfig", "Completion", "SamplingParams", "Score", "load_config", "__version__"]
