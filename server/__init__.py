"""Self-hosted streaming text-to-image server speaking the OpenAI Images API and a WebSocket job protocol."""

__version__ = "0.1.0"
