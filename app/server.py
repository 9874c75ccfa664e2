"""One server, one port: the Gradio UI at / and the OpenAI API at /v1."""
from __future__ import annotations

import hmac
import secrets
import sys
import threading
import time
from dataclasses import replace

from engine.config import Config
from engine.engine import Engine



def build_app(engine: Engine):
    import gradio as gr
    from fastapi import FastAPI

    from app import completions_api, responses_api
    from app.api import make_router
    from app.audio_api import make_audio_router
    from app.images_api import make_image_router
    from app.realtime import make_realtime_router
    from app.read_aloud import make_read_aloud_router
    from app.security import Edge, gradio_session
    from app.ui import ASSETS, build_ui
    from app.voice import make_voice_router

    # the token (when set) guards /v1 and /voice in app/security.Edge, docs included
    api = FastAPI(title="Omni assistant", docs_url="/v1/docs", openapi_url="/v1/openapi.json")
    api.include_router(make_router(engine))
    api.include_router(completions_api.make_router(engine))
    api.include_router(responses_api.make_router(engine))
    api.include_router(make_image_router(engine))
    api.include_router(make_audio_router(engine))
    api.include_router(make_realtime_router(engine))
    api.include_router(make_voice_router(engine))
    api.include_router(make_read_aloud_router(engine))
    demo = build_ui(engine)
    token = engine.config.auth_token
    auth = (lambda user, password: hmac.compare_digest(str(password).encode(), token.encode())) if token else None
    app = gr.mount_gradio_app(api, demo, path="/", allowed_paths=[str(engine.media_dir)], auth=auth,
                               auth_message="Enter any user name and the auth token." if token else None,
                               server_name=engine.config.host, server_port=engine.config.port,
                               max_file_size=engine.config.max_upload_mb * 1_000_000,
                               footer_links=["api"], show_error=False,  # gr.Error texts only: no paths, no internals
                               css_paths=[ASSETS / "ui.css"],
                               head=f"<script>{(ASSETS / 'voice.js').read_text()}</script>")
    # Gradio checks that a file sent to an event was uploaded (not any path on this machine) only
    # once `launch()` has run; mounted, it never does, so say it has: preprocessing then refuses
    # every path outside Gradio's upload folder before copying anything.
    demo.has_launched = True
    return Edge(app, engine.config, gradio_session(app))


class Server:
    """uvicorn in a thread: `start()` returns once it accepts connections; `close()` stops it."""

    def __init__(self, engine: Engine, port: int | None = None) -> None:
        import uvicorn

        self.engine = engine
        self.port = engine.config.port if port is None else port
        config = uvicorn.Config(build_app(engine), host=engine.config.host, port=self.port,
                                log_level="warning", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.engine.config.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "Server":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url} (port in use?)")
            time.sleep(0.05)
        return self

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def serve(config: Config) -> int:
    if config.auth_token == "auto":
        config = replace(config, auth_token=secrets.token_urlsafe(24))
        print(f"Auth token (the API's bearer token and the page's password): {config.auth_token}",
              file=sys.stderr, flush=True)
    engine = Engine(config)
    engine.start_loading()
    server = Server(engine).start()
    print(f"Omni assistant ({config.profile} profile) at {server.url}  (OpenAI API at {server.url}/v1)", flush=True)
    try:
        while server._thread.is_alive():
            server._thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        engine.close()
    return 0
