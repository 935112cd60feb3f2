"""A small Python client for the HTTP API (httpx)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class ServerError(Exception):
    """An error response: `status` (HTTP code) and the server's `message`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.headers = headers or {}


def image_bytes(image: Any) -> bytes:
    """An image as file bytes: a path, bytes, a PIL image or an (H, W, 3) uint8 array (sent as PNG)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"arrays must be (H, W) or (H, W, 3) uint8, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"image must be a path, bytes, a PIL image or a uint8 array, got {type(image).__name__}")


class Client:
    """Talks to `mtpeft serve`.

    Example:
        with mtp.serving.Client("http://127.0.0.1:8000") as client:
            out = client.predict("photo.jpg", tasks=["cls", "boxes"], score_threshold=0.3)
            out["results"]["boxes"]["boxes"]      # [[x1, y1, x2, y2], ...] in the photo's pixels
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", admin_token: str | None = None, timeout: float = 60.0):
        import httpx

        headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _check(self, response: Any) -> Any:
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except Exception:
                message = response.text
            raise ServerError(response.status_code, message, dict(response.headers))
        return response

    def predict(self, image: Any, tasks: Sequence[str] | str, **options: Any) -> dict[str, Any]:
        """Run `tasks` on one image; options: score_threshold, max_detections, mask_format, logits, timeout_s, alpha
        and wise_reference (WiSE, torch backend).

        Returns the server's JSON: {"results": {task: ...}, "image_size": [h, w], "versions": {task: n}}.
        """
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        data = {"tasks": ",".join(names)}
        for key, value in options.items():
            if value is not None:
                data[key] = str(value).lower() if isinstance(value, bool) else str(value)
        files = {"image": ("image", image_bytes(image), "application/octet-stream")}
        return self._check(self._http.post("/v1/predict", data=data, files=files)).json()

    def tasks(self) -> list[dict[str, Any]]:
        return self._check(self._http.get("/v1/tasks")).json()["tasks"]

    def load_task(self, path: str, name: str | None = None) -> dict[str, Any]:
        """Load or replace a task from a folder inside the server's adapter directory (admin token needed)."""
        body = {"path": str(path)} | ({"name": name} if name else {})
        return self._check(self._http.post("/v1/tasks", json=body)).json()["task"]

    def unload_task(self, name: str) -> None:
        self._check(self._http.delete(f"/v1/tasks/{name}"))

    def ready(self) -> bool:
        try:
            return self._http.get("/health/ready").status_code == 200
        except Exception:
            return False

    def metrics(self) -> str:
        return self._check(self._http.get("/metrics")).text
