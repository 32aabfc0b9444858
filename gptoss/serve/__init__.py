"""The OpenAI-compatible server (`gptoss serve`). Needs the `serve` extra: pip install 'gptoss[serve]'.

    from gptoss.serve import build_app, run_server, serve_in_thread
"""

from __future__ import annotations

_NAMES = ("build_app", "run_server", "serve_in_thread", "Metrics", "DEFAULT_MAX_REQUEST_BYTES")
__all__ = list(_NAMES)


def __getattr__(name):
    # fastapi and uvicorn are imported only when the server is actually used
    if name in _NAMES:
        try:
            from . import app
        except ImportError as e:
            raise ImportError(f"gptoss.serve needs the serve extra ({e}); install it with "
                              f"pip install 'gptoss[serve]'") from e
        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
