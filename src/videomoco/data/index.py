"""The dataset index: every video probed once, broken ones quarantined with a reason.

    videomoco index ROOT [--out DIR] [--layout auto|kinetics|ucf101|hmdb51|folder]
                         [--split-dir DIR] [--annotations CSV] [--workers N] [--follow-symlinks]

writes `DIR/index.csv` (one row per usable video: path relative to ROOT, label, class,
splits, metadata, size, mtime), `DIR/quarantine.csv` (path, reason) and `DIR/meta.json`
(root, layout, classes, counts). Re-running probes only new or changed files (by size
and mtime). Training and evaluation call `open_index`, which never re-probes an index and
never rebuilds one of another layout.

Everything stays inside ROOT: symlinks out of it are not followed (a video link is quarantined,
a directory link skipped and counted) unless `--follow-symlinks`, and `VideoIndex.load` refuses
rows whose path leads out of the root. File names that are not UTF-8 are quarantined (index.csv
is UTF-8), shown with their undecodable bytes as `\\xff`.
"""

import csv
import hashlib
import io
import json
import logging
import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from tqdm import tqdm

from videomoco.data import decode
from videomoco.data.layouts import LAYOUTS, SplitFileError, scan_layout
from videomoco.data.workers import pid_alive, process_pool
from videomoco.flags import COUNT, SHARED, config_from, defaults, fail

log = logging.getLogger(__name__)

INFO_FIELDS = ("frames", "fps", "duration", "width", "height", "codec", "rotation", "size", "mtime")
QUARANTINE_FIELDS = ("path", "reason", "size", "mtime")


@dataclass
class VideoRecord:
    """One row of index.csv; split columns are 'train'/'test'/'unused' (ucf101, hmdb51) or
    'train'/'val'/'test' in `subset` (kinetics), empty where the layout has none."""

    path: str
    label: int = -1
    class_name: str = ""
    split1: str = ""
    split2: str = ""
    split3: str = ""
    subset: str = ""
    frames: int = 0
    fps: float = 0.0
    duration: float = 0.0
    width: int = 0
    height: int = 0
    codec: str = ""
    rotation: int = 0
    size: int = 0
    mtime: float = 0.0


RECORD_FIELDS = [f.name for f in fields(VideoRecord)]
_TYPES = {f.name: f.type for f in fields(VideoRecord)}


def _record_from_row(row):
    return VideoRecord(**{k: _TYPES[k](row[k]) if _TYPES[k] is not str else row[k] for k in RECORD_FIELDS if k in row})


@dataclass
class VideoIndex:
    """The usable videos of a dataset root: `records[i]`, `path(i)`, `classes[label]`, `select(...)`."""

    root: str
    layout: str
    classes: list
    records: list
    quarantine: list = field(default_factory=list)  # (relative path, reason)
    dir: str | None = None  # where index.csv lives, for add_quarantine
    meta: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.records)

    def path(self, i):
        """Absolute path of video `i`."""
        return os.path.join(self.root, self.records[i].path)

    def select(self, subset=None, split=1):
        """The videos of one subset: 'train'/'test' of fold `split` (ucf101, hmdb51), the
        'train'/'val'/'test' folder (kinetics); None keeps all."""
        if subset is None:
            return replace(self, records=list(self.records))
        if self.layout in ("ucf101", "hmdb51"):
            if subset not in ("train", "test") or split not in (1, 2, 3):
                raise ValueError(f"{self.layout} has subsets train/test and splits 1-3, got {subset!r}, {split!r}")
            records = [r for r in self.records if getattr(r, f"split{split}") == subset]
        elif self.layout == "kinetics":
            if subset not in ("train", "val", "test"):
                raise ValueError(f"kinetics has subsets train/val/test, got {subset!r}")
            records = [r for r in self.records if r.subset == subset]
        else:
            raise ValueError(f"layout {self.layout!r} has no subsets; use subset=None")
        return replace(self, records=records)

    def add_quarantine(self, path, reason):
        """Record a video that failed at training time (appends one line to quarantine.csv)."""
        path = os.path.relpath(path, self.root) if os.path.isabs(path) else str(path)
        reason = " ".join(str(reason).split())
        self.quarantine.append((path, reason))
        try:  # size and mtime keep it quarantined when the index is rebuilt, until the file changes
            stat = os.stat(os.path.join(self.root, path))
            key = [str(stat.st_size), str(stat.st_mtime)]
        except OSError:
            key = ["", ""]
        if self.dir is not None:
            with open(os.path.join(self.dir, "quarantine.csv"), "a", newline="", encoding="utf-8") as f:
                f.write(_csv_line([path, reason, *key]))  # one write: safe to append from several workers

    def save(self, out):
        """Write index.csv, quarantine.csv and meta.json into `out` (each atomically)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        rows = [asdict(r) for r in self.records]
        write_csv(out / "index.csv", RECORD_FIELDS, [[row[k] for k in RECORD_FIELDS] for row in rows])
        write_csv(out / "quarantine.csv", QUARANTINE_FIELDS, [list(q) + [""] * (4 - len(q)) for q in self.quarantine])
        meta = dict(self.meta, root=str(self.root), layout=self.layout, classes=list(self.classes))
        _atomic_write(out / "meta.json", json.dumps(meta, indent=2) + "\n")
        self.dir = str(out)
        return out

    @classmethod
    def load(cls, location, allow_outside=False):
        """Read an index directory or its index.csv (meta.json must sit next to it).

        Rows whose path is absolute or leads out of the root (`../x`) are refused unless `allow_outside`.
        """
        location = Path(location)
        out = location.parent if location.suffix == ".csv" else location
        if not (out / "index.csv").is_file() or not (out / "meta.json").is_file():
            raise FileNotFoundError(f"no index at {out} (need index.csv and meta.json): run `videomoco index ROOT`")
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        with open(out / "index.csv", newline="", encoding="utf-8") as f:
            records = [_record_from_row(row) for row in csv.DictReader(f)]
        outside = [r.path for r in records if not _inside_root(meta["root"], r.path)]
        if outside and not allow_outside:
            raise ValueError(f"{out / 'index.csv'}: {len(outside)} rows point outside the dataset root {meta['root']}, "
                             f"e.g. {outside[0]!r}")
        quarantine = [tuple(q[:2]) for q in _read_quarantine(out)]
        broken = {q[0] for q in quarantine}  # includes videos quarantined at training time
        records = [r for r in records if r.path not in broken]
        return cls(meta["root"], meta["layout"], meta["classes"], records, quarantine, str(out), meta)


def _inside_root(root, path):
    """A relative path that stays inside `root` (checked on the text, as a path in index.csv is joined)."""
    root = os.path.normpath(root)
    return not os.path.isabs(path) and os.path.commonpath([root, os.path.normpath(os.path.join(root, path))]) == root


def _csv_line(values):
    buf = io.StringIO()
    csv.writer(buf).writerow(values)
    return buf.getvalue()


def _atomic_write(path, text):
    """Write a temporary file next to `path`, then rename it; the temporary file never outlives a failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_tmp(out):
    """Temporary files left by an index build that was killed (`.index.csv.<pid>.tmp` of a dead pid)."""
    for tmp in Path(out).glob(".*.tmp"):
        match = re.fullmatch(r"\.(?:index\.csv|quarantine\.csv|meta\.json)\.(\d+)\.tmp", tmp.name)
        if match and not pid_alive(int(match.group(1))):
            tmp.unlink(missing_ok=True)


def write_csv(path, header, rows):
    """Write a CSV file of `header` and `rows` atomically (UTF-8)."""
    _atomic_write(path, "".join(_csv_line(r) for r in [header, *rows]))


def _read_quarantine(out):
    """Rows [path, reason, size, mtime] of quarantine.csv (size/mtime empty for training-time entries)."""
    path = Path(out) / "quarantine.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    return [row + [""] * (4 - len(row)) for row in rows if row]


def default_out(root):
    """ROOT/index if writable, else ~/.cache/videomoco/index/<name>-<hash of ROOT>."""
    root = Path(root).resolve()
    if os.access(root, os.W_OK):
        return root / "index"
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    return Path.home() / ".cache" / "videomoco" / "index" / f"{root.name}-{digest}"


def _probe_one(path):
    """(VideoInfo fields as a dict, None) or (None, reason) — never raises, so a pool never dies."""
    try:
        return asdict(decode.probe(path)), None
    except decode.VideoError as err:
        return None, err.reason
    except Exception as err:  # a probe bug must quarantine one file, not stop the indexing
        return None, f"probe failed: {type(err).__name__}: {' '.join(str(err).split())}"


def _probe_all(paths, workers, progress):
    """Probe `paths` in `workers` processes (1: in this process), with a progress bar."""
    bar = dict(total=len(paths), desc="probing", unit="video", disable=not progress or not paths, file=sys.stderr)
    if workers <= 1 or len(paths) < 2:
        return [_probe_one(p) for p in tqdm(paths, **bar)]
    chunk = max(1, min(64, len(paths) // (workers * 8)))
    with process_pool(workers) as pool:
        return list(tqdm(pool.map(_probe_one, paths, chunksize=chunk), **bar))


def build_index(root, out=None, layout="auto", split_dir=None, annotations=None, workers=None, progress=True,
                follow_symlinks=False):
    """Scan `root`, probe new or changed videos, write the index into `out` -> VideoIndex.

    Rows and quarantine entries of files whose size and mtime did not change are reused. Video files
    that cannot be used whatever their content (a name that is not UTF-8, a dangling symlink, a symlink
    out of `root` without `follow_symlinks`) are quarantined with that reason, unprobed.
    """
    root = Path(root).resolve()
    if isinstance(annotations, (str, os.PathLike)):
        annotations = [annotations]
    annotations = [str(a) for a in annotations or ()]
    if not root.is_dir():
        raise NotADirectoryError(f"dataset root {root} is not a directory")
    out = Path(out) if out else default_out(root)
    if Path(root).resolve() not in out.resolve().parents and not os.access(root, os.W_OK):
        log.info("%s is not writable: its index goes to %s (or give --out)", root, out)
    scan = scan_layout(root, layout, split_dir, annotations, exclude=[out], follow_symlinks=follow_symlinks)
    if scan.outside:
        log.warning("skipped %d directory symlinks that point outside %s (use --follow-symlinks)", scan.outside, root)
    previous, old_quarantine = {}, {}
    if (out / "index.csv").is_file() and (out / "meta.json").is_file():
        with open(out / "index.csv", newline="", encoding="utf-8") as f:
            previous = {row["path"]: _record_from_row(row) for row in csv.DictReader(f)}
        old_quarantine = {q[0]: q for q in _read_quarantine(out) if q[2]}
    label_of = {name: i for i, name in enumerate(scan.classes)}
    records, to_probe = [], []
    quarantine = [[rel, reason, "", ""] for rel, reason in scan.problems.items()]
    for rel, entry in scan.videos.items():
        stat = os.stat(root / rel)
        key = (stat.st_size, stat.st_mtime)
        entry = dict(entry, label=label_of.get(entry.get("class_name", ""), -1))
        old = previous.get(rel)
        if rel in old_quarantine and tuple(old_quarantine[rel][2:4]) == (str(key[0]), str(key[1])):
            quarantine.append(old_quarantine[rel])
        elif old is not None and (old.size, old.mtime) == key:
            labels = {k: entry.get(k, "") for k in ("class_name", "split1", "split2", "split3", "subset")}
            records.append(replace(old, **labels, label=entry["label"]))
        else:
            to_probe.append((rel, entry))
    workers = workers or os.cpu_count() or 1
    results = _probe_all([str(root / rel) for rel, _ in to_probe], workers, progress)
    for (rel, entry), (info, reason) in zip(to_probe, results):
        if info is None:
            stat = os.stat(root / rel)
            quarantine.append([rel, reason, str(stat.st_size), str(stat.st_mtime)])
        else:
            records.append(VideoRecord(path=rel, **{k: v for k, v in entry.items() if k in RECORD_FIELDS}, **info))
    records.sort(key=lambda r: r.path)
    quarantine.sort(key=lambda q: q[0])
    counts = {"videos": len(records), "quarantined": len(quarantine), "probed": len(to_probe),
              "reused": len(scan.videos) - len(to_probe), "missing": scan.missing}
    meta = {"counts": counts, "split_dir": str(split_dir or ""), "annotations": annotations}
    index = VideoIndex(str(root), scan.name, scan.classes, records, [tuple(q) for q in quarantine], None, meta)
    _remove_stale_tmp(out)
    index.save(out)
    return index


def summary(index):
    """The one line `videomoco index` prints."""
    counts = index.meta["counts"]
    line = f"indexed {counts['videos']:,} videos, quarantined {counts['quarantined']:,}"
    if counts["quarantined"]:
        where = os.path.join(index.dir, "quarantine.csv")
        rel = os.path.relpath(where)
        line += f": see {where if rel.startswith('..') else rel}"
    rel = os.path.relpath(index.dir)
    line += f"; index in {index.dir if rel.startswith('..') else rel}"
    if counts["missing"]:
        line += f"; split files name {counts['missing']:,} videos that are not on disk"
    return line


def open_index(data, layout="auto", workers=None, asked=None):
    """An index from an index directory, its index.csv, or a dataset root.

    A root is indexed into `default_out(root)` the first time; afterwards that index is
    loaded as is (run `videomoco index ROOT` to pick up new files). An index of another layout
    than `layout` ("auto": any) is never rebuilt: a one-line ValueError says what to do, naming
    `asked` (what asked for the layout, e.g. "--dataset folder").
    """
    data = Path(data)
    if data.suffix == ".csv" or (data / "index.csv").is_file():
        index = VideoIndex.load(data)
    elif not data.is_dir():
        raise FileNotFoundError(f"{data} is neither an index (index.csv) nor a dataset directory")
    elif (default_out(data) / "index.csv").is_file():
        index = VideoIndex.load(default_out(data))
    else:
        index = build_index(data, default_out(data), layout=layout, workers=workers)
        log.info(summary(index))
    if not index.records and layout not in ("auto", index.layout):  # its layout was guessed from nothing
        raise ValueError(f"{index.dir} indexes no videos ({index.root} had none when it was indexed): put the "
                         f"videos there, then run `videomoco index {index.root} --layout {layout}`")
    if layout not in ("auto", index.layout):
        what = f"; {asked} needs {layout}: use the matching {asked.split()[0]}" if asked else f", not {layout}"
        raise ValueError(f"{index.dir} is indexed as {index.layout}{what}, or index again with "
                         f"`videomoco index {index.root} --layout {layout} --out OTHER_DIR`")
    return index


def pretrain_subset(index, subset="train"):
    """The videos to pretrain on and a one-line description for the log -> (VideoIndex, str).

    kinetics: the `subset` column (train/val/test); ucf101/hmdb51: fold `subset` (train/test) of split 1;
    "all": every video, those in no split included; a folder layout has no subsets: all its videos.
    """
    total = len(index)
    if index.layout == "folder":
        return index.select(None), f"all {total:,} videos (a folder layout has no subsets)"
    if subset == "all":
        return index.select(None), f"{index.layout}, all subsets: {total:,} videos"
    column, where = ("subset", "") if index.layout == "kinetics" else ("split1", " of split 1")
    selected = replace(index, records=[r for r in index.records if getattr(r, column) == subset])
    if total and not selected.records:
        counts = Counter(getattr(r, column) for r in index.records)
        if set(counts) == {""}:
            raise ValueError(f"{index.root} ({index.layout}) has no {subset!r} videos{where}: none of its {total:,} "
                             "videos is in a subset (use --subset all)")
        have = ", ".join(f"{name} {n:,}" if name else f"{n:,} in no subset" for name, n in sorted(counts.items()))
        raise ValueError(f"{index.root} ({index.layout}) has no {subset!r} videos{where}; it has {have} "
                         "(choose one of those, or 'all')")
    return selected, f"{index.layout} {subset}{where}: {len(selected):,} of {total:,} videos"


@dataclass
class IndexConfig:
    root: str
    out: str | None = None
    layout: str = "auto"
    split_dir: str | None = None
    annotations: list = field(default_factory=list)
    workers: int | None = None
    progress: bool = True
    follow_symlinks: bool = False


def run(cfg):
    """Build the index -> {"index_dir", "videos", "quarantined", "missing", "summary"}."""
    index = build_index(cfg.root, cfg.out, cfg.layout, cfg.split_dir, cfg.annotations or None, cfg.workers, cfg.progress,
                        cfg.follow_symlinks)
    counts = index.meta["counts"]
    return {"index_dir": index.dir, "videos": counts["videos"], "quarantined": counts["quarantined"],
            "missing": counts["missing"], "summary": summary(index)}


def add_arguments(parser):
    d = defaults(IndexConfig)
    parser.add_argument("root", help="dataset root directory")
    parser.add_argument("--out", default=d["out"], help="index directory (default ROOT/index, or ~/.cache/videomoco/index/...)")
    parser.add_argument("--layout", default=d["layout"], choices=("auto",) + LAYOUTS)
    parser.add_argument("--split-dir", default=d["split_dir"],
                        help="UCF101 ucfTrainTestlist/ or HMDB51 testTrainMulti_7030_splits/")
    parser.add_argument("--annotations", action="append", default=d["annotations"], help="Kinetics CSV (repeatable)")
    parser.add_argument(*SHARED["workers"], type=COUNT, default=d["workers"],
                        help="probing processes (default or 0: all cores)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--follow-symlinks", action="store_true", help="also follow symlinks that point outside ROOT")


def main(args):
    cfg = config_from(IndexConfig, args)
    try:
        print(run(cfg)["summary"])
    except (SplitFileError, OSError) as err:  # bad split file, missing root: one line, no traceback
        return fail("index", err)
    return 0
