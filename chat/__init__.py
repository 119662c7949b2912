"""The chat app: a conversation held in a linearized model's constant-size state."""

from .model import bundled_adapter, load_chat_model  # noqa: F401
from .session import ChatSession, sampling  # noqa: F401
from .state import load_state, save_state  # noqa: F401
