"""Measurement text: an English Wikipedia excerpt shipped inside the ``gensim==4.4.0`` wheel.

The wheel carries ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
a 2016 MediaWiki XML dump excerpt (206 pages: 105 articles, 100 redirects, 1 project page).
:func:`measurement_text` turns it into plain text deterministically with ``mwparserfromhell``:

* only main-namespace (``ns 0``), non-redirect pages, in dump order;
* each article starts with a heading line ``= Title =``; section headings become
  ``== Heading ==`` lines (``=`` repeated by level); sections that are mostly link/citation
  lists (References, External links, See also, Notes, Further reading, ...) are dropped;
* templates, ``<ref>``/tables/galleries/math and similar tags, comments, file/image/
  category/interlanguage links are removed; other links keep their visible text; HTML
  entities are decoded; bold/italic markup is stripped;
* whitespace is collapsed inside lines, empty lines and ones left with only punctuation are
  dropped, every remaining line is one paragraph (or list item);
* articles are joined with blank lines.

The result is cached under ``<cache_root>/text/`` (temp file + atomic rename).
"""

from __future__ import annotations

import bz2
import hashlib
import html
import os
import re
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from functools import lru_cache
from pathlib import Path

from . import paths
from .models import WheelPart, download_wheel

__all__ = [
    "GENSIM_WHEEL",
    "ENWIKI_MEMBER",
    "ENWIKI_MEMBER_SHA256",
    "TEXT_VERSION",
    "enwiki_xml_bytes",
    "wikitext_to_plain",
    "mediawiki_xml_to_text",
    "measurement_text",
    "measurement_text_file",
    "wikitext_polarquant_slice",
]

ENWIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
ENWIKI_MEMBER_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"  # the .bz2 member
ENWIKI_XML_SHA256 = "34c1c63050c87cc8477b9ae36b1cb0edf372612c92938b742e579a7109c20fa4"  # decompressed XML

# Pinned to the CPython 3.11 manylinux x86_64 wheel regardless of the host interpreter.
GENSIM_WHEEL = WheelPart(
    package="gensim",
    version="4.4.0",
    filename="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    member=ENWIKI_MEMBER,
    pip_args=(
        "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
        "--implementation", "cp", "--abi", "cp311",
    ),
)

# Bump when the cleaning rules change (it is part of the cache file name).
TEXT_VERSION = 1

_DROP_TAGS = frozenset(
    {
        "ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap",
        "score", "graph", "mapframe", "maplink", "syntaxhighlight", "source", "pre", "hiero",
        "templatedata", "noinclude", "includeonly", "onlyinclude", "inputbox",
        "categorytree", "hr", "div",
    }
)
_DROP_LINK_NS = frozenset({"file", "image", "category", "media", "wikipedia", "wp", "template", "help", "portal", "special"})
_INTERLANG = re.compile(r"^[a-z]{2,3}(-[a-z]{2,8})*$")
_DROP_SECTIONS = frozenset(
    {
        "references", "external links", "see also", "notes", "further reading", "bibliography",
        "sources", "footnotes", "citations", "notes and references", "references and notes",
        "works cited", "external link", "reference", "note", "selected bibliography",
    }
)


def _ns(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def enwiki_xml_bytes() -> bytes:
    """The decompressed MediaWiki XML (wheel pip-downloaded to a temp dir, sha256-verified)."""
    with tempfile.TemporaryDirectory(prefix="hlwq-gensim-") as tmp:
        wheel = download_wheel(GENSIM_WHEEL, tmp)
        with zipfile.ZipFile(wheel) as zf:
            member = zf.read(ENWIKI_MEMBER)
    got = hashlib.sha256(member).hexdigest()
    if got != ENWIKI_MEMBER_SHA256:
        raise RuntimeError(f"sha256 mismatch for {ENWIKI_MEMBER}: {got}")
    xml = bz2.decompress(member)
    if hashlib.sha256(xml).hexdigest() != ENWIKI_XML_SHA256:
        raise RuntimeError("sha256 mismatch for the decompressed enwiki XML")
    return xml


def _plain(code, out: list[str]) -> None:
    """Append the visible text of a ``mwparserfromhell`` Wikicode to ``out``."""
    from mwparserfromhell import nodes as N

    skip_level = 0  # >0 while inside a dropped section of that heading level
    for node in code.nodes:
        if isinstance(node, N.Heading):
            title = _inline(node.title)
            if skip_level and node.level > skip_level:
                continue
            skip_level = 0
            if title.lower().strip(" :") in _DROP_SECTIONS:
                skip_level = node.level
                continue
            if title:
                bar = "=" * node.level
                out.append(f"\n{bar} {title} {bar}\n")
            continue
        if skip_level:
            continue
        if isinstance(node, N.Text):
            out.append(node.value)
        elif isinstance(node, N.Wikilink):
            title = str(node.title).strip()
            if title.startswith(":"):
                title = title[1:]
            if ":" in title:
                prefix = title.split(":", 1)[0].strip().lower()
                if prefix in _DROP_LINK_NS or _INTERLANG.match(prefix):
                    continue
            if node.text is not None:
                _plain(node.text, out)
            else:
                out.append(title.split("#", 1)[0] if not title.startswith("#") else title[1:])
        elif isinstance(node, N.ExternalLink):
            if node.title is not None:
                _plain(node.title, out)
        elif isinstance(node, N.Tag):
            tag = str(node.tag).strip().lower()
            if tag in _DROP_TAGS:
                continue
            if tag == "br":
                out.append("\n")
            elif tag in ("li", "dt", "dd") and node.wiki_markup:
                pass  # list bullets: the item text follows as plain nodes
            elif node.contents is not None:
                _plain(node.contents, out)
        elif isinstance(node, N.HTMLEntity):
            out.append(node.normalize())
        # Template, Comment, Argument and anything else: dropped


def _inline(code) -> str:
    buf: list[str] = []
    _plain(code, buf)
    return re.sub(r"\s+", " ", "".join(buf)).strip()


_WS = re.compile(r"[ \t\u00a0\u2009\u200b\u3000]+")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]*\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[]) +")
_ONLY_PUNCT = re.compile(r"^[\W_]*$")
# residual raw markup where mwparserfromhell gave up and returned text verbatim
_RESID_REF = re.compile(r"<ref[^<>]*/>|<ref[^<>]*>.*?(?:</ref>|$)", re.I)
_RESID_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_RESID_TPL = re.compile(r"\{\{[^{}]*\}\}")
_RESID_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]")
_RESID_EXT = re.compile(r"\[https?://[^\s\]]+\s*([^\]]*)\]")
_TABLE_LINE = re.compile(r"^\s*(\{\||\|\}|\||!)")
_FILE_LINE = re.compile(r"^\s*\[\[\s*(file|image|category)\s*:", re.I)


def _clean_line(line: str) -> str:
    if _TABLE_LINE.match(line) or _FILE_LINE.match(line):
        return ""
    line = _RESID_REF.sub("", line)
    for _ in range(4):  # nested templates, innermost first
        new = _RESID_TPL.sub("", line)
        if new == line:
            break
        line = new
    line = _RESID_LINK.sub(r"\1", line)
    line = _RESID_EXT.sub(r"\1", line)
    line = _RESID_TAG.sub("", line)
    line = html.unescape(line)
    line = _WS.sub(" ", line)
    line = _EMPTY_PARENS.sub("", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    line = _SPACE_AFTER_OPEN.sub(r"\1", line)
    line = _WS.sub(" ", line).strip()
    # leftover bold/italic quote runs (unbalanced markup)
    line = re.sub(r"'{2,}", "", line).strip()
    return line


def wikitext_to_plain(wikitext: str) -> list[str]:
    """Plain-text lines (paragraphs / list items / section headings) of one article's wikitext."""
    import mwparserfromhell

    buf: list[str] = []
    _plain(mwparserfromhell.parse(wikitext), buf)
    lines = []
    for raw in "".join(buf).split("\n"):
        line = _clean_line(raw)
        if not line or _ONLY_PUNCT.match(line):
            continue
        lines.append(line)
    # drop headings left without any body text under them
    keep: list[str] = []
    for i, line in enumerate(lines):
        if line.startswith("=") and line.endswith("="):
            level = len(line) - len(line.lstrip("="))
            nxt = lines[i + 1] if i + 1 < len(lines) else None
            if nxt is None or (nxt.startswith("=") and nxt.endswith("=") and len(nxt) - len(nxt.lstrip("=")) <= level):
                continue
        keep.append(line)
    return keep


def mediawiki_xml_to_text(xml: bytes) -> str:
    """Deterministic plain text of all main-namespace, non-redirect pages of a MediaWiki dump."""
    root = ET.fromstring(xml)
    articles: list[str] = []
    for page in root:
        if _ns(page.tag) != "page":
            continue
        fields = {_ns(c.tag): c for c in page}
        if fields.get("ns") is None or (fields["ns"].text or "").strip() != "0" or "redirect" in fields:
            continue
        title = (fields["title"].text or "").strip()
        rev = fields.get("revision")
        text_el = None if rev is None else next((c for c in rev if _ns(c.tag) == "text"), None)
        wikitext = "" if text_el is None else (text_el.text or "")
        if re.match(r"\s*#redirect", wikitext, re.I):
            continue
        body = wikitext_to_plain(wikitext)
        if not body:
            continue
        articles.append("\n".join([f"= {title} =", *body]))
    return "\n\n".join(articles) + "\n"


def measurement_text_file(*, force: bool = False) -> Path:
    """Path of the cached measurement text (built on first use)."""
    d = paths.cache_root() / "text"
    path = d / f"enwiki-gensim-4.4.0-v{TEXT_VERSION}.txt"
    if path.is_file() and not force:
        return path
    d.mkdir(parents=True, exist_ok=True)
    _write_text_atomically(path, mediawiki_xml_to_text(enwiki_xml_bytes()))
    return path


def _write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it there (readers never see a partial text)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@lru_cache(maxsize=1)
def _cached_text(path: str, mtime_ns: int) -> str:
    return Path(path).read_text(encoding="utf-8")


def measurement_text() -> str:
    """The measurement text (see module docstring)."""
    p = measurement_text_file()
    return _cached_text(str(p), p.stat().st_mtime_ns)


def calibration_text_file() -> Path:
    """Path of the calibration text for importance matrices: the second half of the measurement text, from the
    first article that starts there.

    Every measurement reads the text from its start (at most the first ~150,000 characters), so statistics
    gathered on this half never see the tokens they are judged on.
    """
    source = measurement_text_file()
    path = source.with_name(source.stem + "-calibration.txt")
    if path.is_file() and path.stat().st_mtime_ns >= source.stat().st_mtime_ns:
        return path
    text = measurement_text()
    start = text.find("\n\n= ", len(text) // 2)
    if start < 0:
        raise RuntimeError(f"{source}: no article starts in the second half of the measurement text")
    _write_text_atomically(path, text[start + 2:])
    return path


def wikitext_polarquant_slice(text: str | None = None, n_chars: int = 150_000) -> str:
    """First ``n_chars`` characters of ``text`` (default: :func:`measurement_text`) after
    re-joining its non-empty lines with blank lines (WikiText-style paragraph spacing)."""
    if text is None:
        text = measurement_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "\n\n".join(lines)[:n_chars]
