"""`lorafit ui`: a small ASGI app (starlette, served by uvicorn) with plain HTML/JS pages, all local.

It binds to 127.0.0.1 unless told otherwise, answers only requests addressed to a local host name (a page on
another site cannot reach it through DNS rebinding), takes commands only as JSON posts (a plain HTML form on
another site cannot send those), and serves files only from inside run directories of the runs folder.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lorafit.errors import LorafitError, RunDirError
from lorafit.ui import runs as run_views
from lorafit.ui.chat import ChatModels, load_tools, tool_names
from lorafit.ui.data import DataViews, candidates
from lorafit.ui.train import Launcher, config_form, validate

STATIC = Path(str(files("lorafit.ui") / "static"))
LOCAL_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


class UiState:
    def __init__(self, runs: Path, root: Path):
        self.runs, self.root = runs, root
        self.data = DataViews()
        self.launcher = Launcher(runs)
        self.chat = ChatModels(runs)


def _error(err: LorafitError) -> JSONResponse:
    status = 404 if isinstance(err, RunDirError) else 400
    return JSONResponse({"error": err.message, "hint": err.hint}, status_code=status)


async def _body(request: Request) -> dict:
    """A command's JSON body; anything else is refused (a cross-site form post cannot set this content type)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise LorafitError("commands are JSON posts (Content-Type: application/json).")
    try:
        body = await request.json()
    except ValueError:
        raise LorafitError("the request body is not JSON.") from None
    if not isinstance(body, dict):
        raise LorafitError("the request body must be a JSON object.")
    return body


def _max_length(value) -> int | None:
    """The Data view's max-length override: empty for the config's own, else a positive whole number of tokens."""
    if value in (None, ""):
        return None
    if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < 1:
        raise LorafitError(f"`max_length` must be a whole number of tokens of at least 1, got {value!r}.")
    return int(value)


def _run_routes(state: UiState) -> list:
    """The page, its static files, and the Runs and live views' endpoints."""

    async def index(request):
        return FileResponse(STATIC / "index.html")

    async def runs_list(request):
        state.launcher.reap()
        return JSONResponse({"runs": await run_in_threadpool(run_views.list_runs, state.runs), "dir": str(state.runs)})

    async def run_detail(request):
        return JSONResponse(await run_in_threadpool(run_views.run_detail, state.runs, request.path_params["name"]))

    async def run_stop(request):
        await _body(request)
        return JSONResponse(run_views.stop_run(state.runs, request.path_params["name"]))

    async def run_file(request):
        p = request.path_params
        return FileResponse(run_views.served_file(state.runs, p["name"], p["file"]))

    return [
        Route("/", index),
        Route("/api/runs", runs_list),
        Route("/api/runs/{name}", run_detail),
        Route("/api/runs/{name}/stop", run_stop, methods=["POST"]),
        Route("/runs/{name}/{file:path}", run_file),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]


def _tool_routes(state: UiState) -> list:
    """The Data and Train views' endpoints."""

    async def data_files(request):
        return JSONResponse({"files": await run_in_threadpool(candidates, state.root), "cwd": str(state.root)})

    async def data_check(request):
        body = await _body(request)
        target = str(body.get("target") or "")
        max_length = _max_length(body.get("max_length"))
        return JSONResponse(await run_in_threadpool(state.data.check, target, body.get("model") or None, max_length))

    async def data_examples(request):
        q = request.query_params
        start, count = int(q.get("start", 0)), int(q.get("count", 5))
        return JSONResponse(await run_in_threadpool(state.data.examples, q.get("target", ""), start, count))

    async def train_form(request):
        return JSONResponse(await run_in_threadpool(config_form, request.query_params.get("config", ""), state.runs))

    async def train_validate(request):
        body = await _body(request)
        changes = body.get("changes") or {}
        return JSONResponse(await run_in_threadpool(validate, str(body.get("config", "")), changes, state.runs))

    async def train_start(request):
        body = await _body(request)
        changes = body.get("changes") or {}
        return JSONResponse(await run_in_threadpool(state.launcher.start, str(body.get("config", "")), changes))

    return [
        Route("/api/files", data_files),
        Route("/api/data/check", data_check, methods=["POST"]),
        Route("/api/data/examples", data_examples),
        Route("/api/train/form", train_form),
        Route("/api/train/validate", train_validate, methods=["POST"]),
        Route("/api/train/start", train_start, methods=["POST"]),
    ]


def _chat_routes(state: UiState) -> list:
    """The Chat view's endpoints: the run's prompt settings, a tools box's check, and the streamed answers."""

    async def chat_info(request):
        return JSONResponse(await run_in_threadpool(state.chat.info, request.path_params["name"]))

    async def chat_tools(request):
        body = await _body(request)
        return JSONResponse({"tools": tool_names(await run_in_threadpool(load_tools, body.get("tools"), state.root))})

    async def chat_answer(request):
        body = await _body(request)
        stream = state.chat.stream(
            request.path_params["name"],
            str(body.get("side", "tuned")),
            body.get("history"),
            body.get("system"),
            max(1, min(int(body.get("max_new_tokens", 128)), 2048)),
            await run_in_threadpool(load_tools, body.get("tools"), state.root),
        )
        return StreamingResponse(stream, media_type="application/x-ndjson")

    return [
        Route("/api/tools/check", chat_tools, methods=["POST"]),
        Route("/api/chat/{name}", chat_info),
        Route("/api/chat/{name}/answer", chat_answer, methods=["POST"]),
    ]


def build_app(runs: str | Path, root: str | Path | None = None, hosts: list[str] | None = None) -> Starlette:
    """The app for RUNS (the runs folder); ROOT is where the Data and Train views look for files (the cwd)."""
    state = UiState(Path(runs).expanduser().resolve(), Path(root or Path.cwd()).resolve())

    async def lorafit_error(request, err):
        return _error(err)

    async def bad_number(request, err):
        return JSONResponse({"error": f"a number was expected: {err}", "hint": None}, status_code=400)

    app = Starlette(
        routes=_run_routes(state) + _tool_routes(state) + _chat_routes(state),
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts or LOCAL_HOSTS)],
        exception_handlers={LorafitError: lorafit_error, ValueError: bad_number},
    )
    app.state.ui = state
    return app


def serve(runs: str, host: str = "127.0.0.1", port: int = 7860) -> None:
    import uvicorn

    hosts = LOCAL_HOSTS if host in ("127.0.0.1", "localhost", "::1") else ["*"]  # --host: the user opened it up
    app = build_app(runs, hosts=hosts)
    print(f"lorafit ui: http://{host}:{port}/  (runs folder {app.state.ui.runs}; Ctrl-C to stop)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        app.state.ui.launcher.reap()
