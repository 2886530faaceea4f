"""An OpenAI-compatible HTTP server (FastAPI + uvicorn): request schemas, the engine (queue + worker thread
over :func:`companion.inference.decoding.stream`), the app, and ways to launch it."""

from companion.serving.app import create_app
from companion.serving.cli import load_for_serving
from companion.serving.engine import Codec, Engine, EngineConfig, Job, TextAssembler
from companion.serving.launch import ServerThread, free_port, wait_healthy
from companion.serving.schemas import APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, error_body

__all__ = ["create_app", "load_for_serving", "Codec", "Engine", "EngineConfig", "Job", "TextAssembler",
           "ServerThread", "free_port", "wait_healthy", "APIError", "ChatCompletionRequest", "ChatMessage",
           "CompletionRequest", "error_body"]
