"""The conversation pipeline shared by Discord (``bot/``) and the terminal (``kotonoha chat``)."""

from kotonoha_bot.chat.conversation import Conversation, Incoming
from kotonoha_bot.chat.service import ChatReply, ChatService, SessionSummary
from kotonoha_bot.chat.sessions import SessionManager

__all__ = [
    "ChatReply",
    "ChatService",
    "Conversation",
    "Incoming",
    "SessionManager",
    "SessionSummary",
]
