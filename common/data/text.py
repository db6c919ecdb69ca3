"""Text a site trains on: its own folder of UTF-8 ``.txt`` files, cut into training windows.

:func:`load_text_folder` reads a site's folder (data set ``text-folder``); :class:`TokenBlocks`
cuts an encoded text into ``(x, y)`` training windows. :class:`TextDataError` is the error of
the whole text-data layer: Shakespeare (``common.data.shakespeare``) and the tokenizers
(``common.data.tokenizers``) raise it too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


class TextDataError(ValueError):
    """Text data cannot be loaded or split; the message names the file/setting and the fix."""


# --------------------------------------------------------------------------- a site's own text


def load_text_folder(path: str | Path, setting: str = "data.path") -> str:
    """All ``*.txt`` files directly in ``path`` (sorted by name), UTF-8, joined by ``"\\n"``.

    Line endings are normalised to ``"\\n"`` and a UTF-8 BOM is dropped. Raises
    :class:`TextDataError` naming the exact file for a missing folder, no ``.txt`` files, an
    empty (or whitespace-only) file, or a file that is not valid UTF-8. ``setting``: the config
    key that named the folder (the server's ``data.eval-path`` holds its held-out text).
    """
    folder = Path(path).expanduser()
    fix = f"set {setting} to a folder of UTF-8 .txt files"
    if not folder.exists():
        raise TextDataError(f"text folder {folder} does not exist; {fix}")
    if not folder.is_dir():
        raise TextDataError(f"text folder {folder} is not a folder; {fix}")
    files = sorted(p for p in folder.glob("*.txt") if p.is_file())
    if not files:
        whose = "the site's training text" if setting == "data.path" else f"the held-out text ({setting})"
        raise TextDataError(f"no .txt files in {folder}; put {whose} there as UTF-8 .txt")
    parts: list[str] = []
    for file in files:
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextDataError(
                f"{file} is not valid UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8 "
                f"(e.g. iconv -f latin1 -t utf-8) or remove it from {folder}"
            ) from exc
        text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        if not text.strip():
            raise TextDataError(f"{file} is empty; add text to it or remove it from {folder}")
        parts.append(text)
    log.info("loaded %d text file(s) from %s (%d chars)", len(files), folder, sum(map(len, parts)))
    return "\n".join(parts)


# --------------------------------------------------------------------------- training windows


class TokenBlocks(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Windows of ``context + 1`` tokens from one encoded text, as ``(x, y)`` with ``y = x`` shifted by one.

    Window ``k`` starts at ``k * stride``. The default ``stride = context`` makes the *targets*
    non-overlapping: every token after the first is predicted exactly once (the last ``x`` token of
    one window is the first ``x`` token of the next). A tail shorter than a full window is dropped.
    """

    def __init__(self, ids: Sequence[int] | torch.Tensor, context: int, stride: int | None = None) -> None:
        if context < 1:
            raise TextDataError(f"context={context}; use a context length of at least 1 token")
        stride = context if stride is None else stride
        if stride < 1:
            raise TextDataError(f"stride={stride}; use a stride of at least 1 token")
        if isinstance(ids, torch.Tensor):
            tokens = ids.detach().to(torch.long).reshape(-1)
        else:
            tokens = torch.tensor(list(ids), dtype=torch.long)
        if tokens.numel() < context + 1:
            raise TextDataError(
                f"the text has {tokens.numel()} tokens but one training window needs "
                f"context+1={context + 1}; add more text or lower the context length"
            )
        self.tokens = tokens
        self.context = context
        self.stride = stride
        self._len = (tokens.numel() - context - 1) // stride + 1

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range for {self._len} windows")
        start = index * self.stride
        chunk = self.tokens[start : start + self.context + 1]
        return chunk[:-1], chunk[1:]
