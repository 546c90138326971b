"""kotonoha-bot: a self-hosted Discord companion bot that remembers."""

__version__ = "0.1.0"
