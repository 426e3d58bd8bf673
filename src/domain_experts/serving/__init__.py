"""Serving a composed model over HTTP: an OpenAI-compatible API where each request names its route (a domain, `base`
or `auto`), and concurrent requests of any routes generate as one mixed batch.

- `schemas.py`: request and response shapes (OpenAI's, and TGI's `/generate`).
- `model_io.py`: every call to the model and its tokenizers.
- `engine.py`: the batching generation engine (a thread that owns the model).
- `app.py`: the FastAPI app (`create_app`).
- `command.py`: `domain-experts serve` (`add_serve_command`) and `serve`.

FastAPI and uvicorn come with `pip install 'domain_experts[serve]'`; this package imports them only when serving.
"""

from .command import add_serve_command, serve


__all__ = ["add_serve_command", "serve"]
