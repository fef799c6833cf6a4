"""Model and adapter names and adapter paths from clients: what is a traversal attempt (400) and what is merely
unknown (404). A name never reaches the filesystem; only an admin's adapter path does, resolved inside the root."""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import unquote

from lifecycle.serve.limits import ApiError

ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


def decoded(text: str) -> str:
    """`text` with percent-encoding undone until it stops changing (so %252e%252e is caught too)."""
    for _ in range(4):
        once = unquote(text)
        if once == text:
            break
        text = once
    return text


def is_traversal(text: str) -> bool:
    """Does this name or relative path try to leave its directory (.., absolute, drive, backslash, NUL)?"""
    plain = decoded(text)
    if "\x00" in plain or "\\" in plain or plain.startswith("/") or PureWindowsPath(plain).drive:
        return True
    return any(part in ("..", ".") for part in plain.split("/")) or plain in ("", ".", "..")


def check_model(name: str, served: list[str]) -> str:
    """A served model name, or 400 for a traversal pattern, or 404 model_not_found."""
    if name in served:
        return name
    if is_traversal(name) or "/" in decoded(name):
        raise ApiError(400, f"model {name!r} is not a valid model name", param="model", code="invalid_model_name")
    raise ApiError(404, f"model {name!r} does not exist; served: {', '.join(served)}", param="model",
                   code="model_not_found")


def check_adapter_name(name: str) -> str:
    """A name an adapter may be loaded under (letters, digits, `._-`, not `.`/`..`), else 400."""
    if is_traversal(name) or not ADAPTER_NAME.fullmatch(name):
        raise ApiError(400, f"adapter name {name!r} is not valid: use letters, digits and ._- only",
                       param="name", code="invalid_model_name")
    return name


def adapter_dir(root: str | None, given: str) -> Path:
    """The adapter directory `given` names inside `root`: 400 for traversal or a symlink leading out, 404 if
    missing, 400 if it holds no safetensors weights (pickles are never loaded)."""
    if root is None:
        raise ApiError(400, "adapter loading is off: the server has no model_root", param="path")
    if is_traversal(given) or PurePosixPath(decoded(given)).is_absolute():
        raise ApiError(400, f"path {given!r} must be a relative path inside the model root", param="path",
                       code="invalid_path")
    base = Path(root).resolve()
    target = (base / decoded(given)).resolve()
    if not target.is_relative_to(base):
        raise ApiError(400, f"path {given!r} leads outside the model root", param="path", code="invalid_path")
    if not target.is_dir():
        raise ApiError(404, f"no adapter directory {given!r} under the model root", param="path",
                       code="model_not_found")
    if not any(target.glob("*.safetensors")):
        raise ApiError(400, f"adapter {given!r} has no .safetensors weights; pickled weights are refused",
                       param="path", code="unsafe_weights")
    return target
