"""Dataset layouts: which files are videos, their class, and which split each belongs to.

    kinetics  ROOT/{train,val,test}/<class>/<file>, or any tree plus the official CSV
              annotations `label,youtube_id,time_start,time_end,split` naming files
              `<youtube_id>_<start:06d>_<end:06d>.<ext>`; column `subset`. With CSVs the
              classes are all the CSVs' labels (sorted), so labels do not depend on what is on disk.
    ucf101    ROOT/<class>/v_<Class>_gXX_cYY.avi plus ucfTrainTestlist/ (classInd.txt,
              trainlist0{1,2,3}.txt, testlist0{1,2,3}.txt); columns `split1..3`.
    hmdb51    ROOT/<class>/<video>.avi plus testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt
              (lines "<video>.avi 0|1|2": unused, train, test); columns `split1..3`.
    folder    any tree of videos; the first-level folder is the class when every video
              sits exactly one level deep, else unlabeled.

UCF101 and HMDB51 also read as unpacked from the official archives: the class folders may sit
in up to two wrapper folders (ROOT/UCF-101/<Class>/, ROOT/UCF101/UCF-101/<Class>/,
ROOT/hmdb51_org/<class>/) and the split folder in ROOT or one folder down.

`scan_layout` returns a `Layout`; split files that name videos not on disk are counted
in `Layout.missing`, and malformed split files raise `SplitFileError` with file:line, as
do split files that name (almost) none of the videos on disk (the videos are elsewhere).
Symlinks are followed inside ROOT only, each directory once (`scan_tree`).
"""

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv")
LAYOUTS = ("kinetics", "ucf101", "hmdb51", "folder")
KINETICS_SUBSETS = {"train": "train", "val": "val", "validate": "val", "valid": "val", "test": "test"}
UCF_SPLIT_DIR, HMDB_SPLIT_DIR = "ucfTrainTestlist", "testTrainMulti_7030_splits"
HMDB_SPLIT = {"0": "unused", "1": "train", "2": "test"}


class SplitFileError(ValueError):
    """A malformed split or annotation file (the message starts with `file:line:`), or split files that
    name no video on disk (`dir:`)."""

    def __init__(self, path, line, message):
        super().__init__(f"{path}:{line}: {message}" if line is not None else f"{path}: {message}")


@dataclass
class Layout:
    """What a layout knows about the videos under a root (paths relative to it, '/' separated)."""

    name: str
    classes: list = field(default_factory=list)  # label -> class name
    videos: dict = field(default_factory=dict)  # relative path -> {"class_name": ..., "split1": ..., ...}
    missing: int = 0  # videos named in split files / annotations that are not on disk
    problems: dict = field(default_factory=dict)  # video files that cannot be used -> reason (see Tree)
    outside: int = 0  # directory symlinks not followed


OUTSIDE_ROOT = "symlink points outside the dataset root"


@dataclass
class Tree:
    """What `scan_tree` found: usable videos, and video files that cannot be used, with a reason."""

    videos: list = field(default_factory=list)  # relative paths, sorted
    problems: dict = field(default_factory=dict)  # printable relative path -> reason
    outside: int = 0  # directory symlinks not followed: they point outside the root


def printable(path):
    """`path` as valid UTF-8 text: undecodable bytes of a file name (kept by Python as surrogates) as `\\xff`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _inside(path, root):
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def scan_tree(root, exclude=(), follow_symlinks=False):
    """Every video under `root` (by extension, recursive); skips hidden entries and the `exclude` dirs.

    Symlinks are followed only inside `root` (anywhere with `follow_symlinks`), and a directory is
    walked once (a link to a directory already walked, e.g. a loop `a/loop -> ..`, is skipped).
    A video whose name is not valid UTF-8, a dangling link or a link out of `root` goes to `problems`.
    """
    root = os.path.realpath(root)
    skip = {os.path.realpath(e) for e in exclude}
    tree = Tree()
    stat = os.stat(root)
    visited = {(stat.st_dev, stat.st_ino)}
    for folder, dirs, files in os.walk(root, followlinks=True):
        kept = []
        for d in sorted(dirs):
            path = os.path.join(folder, d)
            if d.startswith(".") or os.path.realpath(path) in skip:
                continue
            if os.path.islink(path) and not follow_symlinks and not _inside(path, root):
                tree.outside += 1
                continue
            stat = os.stat(path)
            if (stat.st_dev, stat.st_ino) not in visited:
                visited.add((stat.st_dev, stat.st_ino))
                kept.append(d)
        dirs[:] = kept
        for name in files:
            if name.startswith(".") or not name.lower().endswith(VIDEO_EXTENSIONS):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if printable(rel) != rel:
                tree.problems[printable(rel)] = "file name is not valid UTF-8"
            elif os.path.islink(path) and not os.path.exists(path):
                tree.problems[rel] = "dangling symlink"
            elif os.path.islink(path) and not follow_symlinks and not _inside(path, root):
                tree.problems[rel] = OUTSIDE_ROOT
            else:
                tree.videos.append(rel)
    tree.videos.sort()
    return tree


def find_videos(root, exclude=(), follow_symlinks=False):
    """Relative paths of the usable videos under `root`, sorted (see `scan_tree`)."""
    return scan_tree(root, exclude, follow_symlinks).videos


def find_split_dir(root, name):
    """ROOT/name, else ROOT/<folder>/name (the split archive unpacked inside a wrapper folder), else None."""
    root = Path(root)
    if (root / name).is_dir():
        return root / name
    if not root.is_dir():
        return None
    with os.scandir(root) as entries:  # d_type only: no stat per file of a flat Kinetics folder
        folders = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    return next((root / f / name for f in folders if (root / f / name).is_dir()), None)


def detect_layout(root, split_dir=None, annotations=None):
    """'ucf101', 'hmdb51', 'kinetics' or 'folder', from the split files and folder names."""
    root = Path(root)
    split_dir = Path(split_dir) if split_dir else None
    if find_split_dir(root, UCF_SPLIT_DIR) or (split_dir and (split_dir / "classInd.txt").is_file()):
        return "ucf101"
    if find_split_dir(root, HMDB_SPLIT_DIR) or (split_dir and any(split_dir.glob("*_test_split1.txt"))):
        return "hmdb51"
    if annotations or any((root / s).is_dir() for s in KINETICS_SUBSETS):
        return "kinetics"
    return "folder"


def _lines(path):
    """(line number, stripped line) of the non-empty lines of a text file (official files use CRLF)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def _on_disk(videos):
    """Lookup from a split-file name to the path on disk: exact, else case-insensitive, else
    with another video extension (a transcoded copy holds `v_X.mp4` where the list says `v_X.avi`)."""
    lower = {v.lower(): v for v in videos}
    stems = {os.path.splitext(v.lower())[0]: v for v in videos}
    def lookup(name):
        if name in videos:
            return name
        return lower.get(name.lower()) or stems.get(os.path.splitext(name.lower())[0])

    return lookup


def _wrapper(videos, classes):
    """The folders above the class folders: '' for ROOT/<Class>/, 'UCF-101/' for the unpacked archive
    ROOT/UCF-101/<Class>/, up to two deep; the prefix under which most videos sit in a class folder."""
    known = {c.lower() for c in classes}
    counts = Counter()
    for v in videos:
        parts = v.split("/")
        for depth in range(min(3, len(parts) - 1)):
            if parts[depth].lower() in known:
                counts["".join(p + "/" for p in parts[:depth])] += 1
    return max(counts, key=lambda prefix: (counts[prefix], -len(prefix)), default="")


def _labeled_entry(video, prefix):
    """`<prefix><class>/<file>`: the folder is the class; in no fold until a split file says so."""
    rest = video[len(prefix):] if video.startswith(prefix) else ""
    cls = rest.split("/")[0] if "/" in rest else ""
    return {"class_name": cls, "split1": "unused", "split2": "unused", "split3": "unused"}


def _check_found(root, videos, found, named, split_dir, expected):
    """Split files that name (almost) none of the videos on disk (at most 1%) mean the videos are not
    where they should be: one line saying what was expected where, not an index of unlabeled videos."""
    found = len(found)
    if not videos or not named or found > len(videos) // 100:
        return
    what = "none found" if not found else f"only {found:,} of the {len(videos):,} videos"
    raise SplitFileError(split_dir, None, f"the split files name {len(named):,} videos, {what} under {root}: expected "
                                          f"{root}/{expected}; found e.g. {root}/{videos[0]}")


def _ucf101(root, videos, split_dir):
    split_dir = Path(split_dir or find_split_dir(root, UCF_SPLIT_DIR) or Path(root) / UCF_SPLIT_DIR)
    class_file = split_dir / "classInd.txt"
    classes = []
    for n, line in _lines(class_file):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(classes) + 1:
            raise SplitFileError(class_file, n, f'expected "{len(classes) + 1} <ClassName>", got "{line}"')
        classes.append(parts[1])
    known = {c.lower(): i for i, c in enumerate(classes)}
    prefix = _wrapper(videos, classes)
    entries = {v: _labeled_entry(v, prefix) for v in videos}
    lookup, missing, named, matched = _on_disk(entries), set(), {}, set()
    for k in (1, 2, 3):
        for subset in ("train", "test"):
            path = split_dir / f"{subset}list0{k}.txt"
            if not path.is_file():
                continue
            for n, line in _lines(path):
                parts = line.split()
                name = parts[0].replace("\\", "/")
                cls = name.split("/")[0] if "/" in name else ""
                if len(parts) > 2 or (subset == "test" and len(parts) != 1) or cls.lower() not in known:
                    form = "<Class>/<video>.avi" + (" <label>" if subset == "train" else "")
                    raise SplitFileError(path, n, f'expected "{form}" with a class of classInd.txt, got "{line}"')
                label = known[cls.lower()] + 1
                if len(parts) == 2 and (not parts[1].isdigit() or int(parts[1]) != label):
                    raise SplitFileError(path, n, f"label {parts[1]} does not match classInd.txt ({label} {cls})")
                found = lookup(prefix + name)
                named.setdefault(name.lower(), name)
                if found is None:
                    missing.add(name.lower())
                else:
                    entries[found][f"split{k}"] = subset
                    matched.add(found)
    _check_found(root, videos, matched, named, split_dir,
                 "<Class>/v_<Class>_gXX_cXX.avi (the UCF-101 folder of the official archive), e.g. "
                 f"{root}/{min(named.values(), default='')}")
    return Layout("ucf101", classes, entries, len(missing))


def _hmdb51(root, videos, split_dir):
    split_dir = Path(split_dir or find_split_dir(root, HMDB_SPLIT_DIR) or Path(root) / HMDB_SPLIT_DIR)
    pattern = re.compile(r"(.+)_test_split([123])\.txt$")
    files = sorted((m.group(1), int(m.group(2)), p) for p in split_dir.iterdir() if (m := pattern.match(p.name)))
    if not files:
        raise SplitFileError(split_dir, 0, "no <class>_test_split{1,2,3}.txt files")
    classes = sorted({cls for cls, _, _ in files})
    prefix = _wrapper(videos, classes)
    entries = {v: _labeled_entry(v, prefix) for v in videos}
    lookup, missing, named, matched = _on_disk(entries), set(), {}, set()
    for cls, k, path in files:
        for n, line in _lines(path):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in HMDB_SPLIT or not parts[0].lower().endswith(VIDEO_EXTENSIONS):
                raise SplitFileError(path, n, f'expected "<video>.avi 0|1|2", got "{line}"')
            found = lookup(f"{prefix}{cls}/{parts[0]}")
            named.setdefault(f"{cls}/{parts[0]}".lower(), f"{cls}/{parts[0]}")
            if found is None:
                missing.add(f"{cls}/{parts[0]}".lower())
            else:
                entries[found][f"split{k}"] = HMDB_SPLIT[parts[1]]
                matched.add(found)
    _check_found(root, videos, matched, named, split_dir,
                 "<class>/<video>.avi (the class folders of the official hmdb51_org archive, each unpacked from "
                 f"its .rar), e.g. {root}/{min(named.values(), default='')}")
    return Layout("hmdb51", classes, entries, len(missing))


def _read_kinetics_csv(path):
    """youtube-id stem -> (label, subset) from one official Kinetics CSV."""
    rows = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        required = {"youtube_id", "time_start", "time_end"}
        if not required <= set(reader.fieldnames or ()):
            header = ",".join(reader.fieldnames or ())
            raise SplitFileError(path, 1, f'expected the header "label,youtube_id,time_start,time_end,split", got "{header}"')
        for n, row in enumerate(reader, 2):
            try:
                stem = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}"
            except (TypeError, ValueError):
                times = f"{row['time_start']!r}, {row['time_end']!r}"
                raise SplitFileError(path, n, f"time_start and time_end must be integers, got {times}") from None
            subset = KINETICS_SUBSETS.get((row.get("split") or "").strip().lower(), "")
            rows[stem] = ((row.get("label") or "").strip(), subset)
    return rows


def _kinetics(root, videos, annotations):
    entries = {}
    for v in videos:
        parts = v.split("/")
        subset = KINETICS_SUBSETS.get(parts[0].lower(), "") if len(parts) > 1 else ""
        cls = parts[1] if subset and len(parts) == 3 else ""
        entries[v] = {"class_name": cls, "subset": subset}
    missing, labels = 0, set()
    if annotations:
        rows = {}
        for path in annotations:
            rows.update(_read_kinetics_csv(path))
        labels = {label for label, _ in rows.values() if label}
        by_stem = {Path(v).stem: v for v in videos}
        for stem, (label, subset) in rows.items():
            v = by_stem.get(stem)
            if v is None:
                missing += 1
                continue
            entries[v]["class_name"] = label or entries[v]["class_name"]
            entries[v]["subset"] = subset or entries[v]["subset"]
    # the CSVs' labels, not the classes on disk: a partial download keeps the labels of the full one
    classes = sorted(labels or {e["class_name"] for e in entries.values() if e["class_name"]})
    return Layout("kinetics", classes, entries, missing)


def _folder(videos):
    labeled = bool(videos) and all(v.count("/") == 1 for v in videos)
    entries = {v: {"class_name": v.split("/")[0] if labeled else ""} for v in videos}
    return Layout("folder", sorted({e["class_name"] for e in entries.values()}) if labeled else [], entries)


def scan_layout(root, layout="auto", split_dir=None, annotations=None, exclude=(), follow_symlinks=False):
    """Find the videos under `root` and read their classes/splits -> Layout.

    `annotations` is a Kinetics CSV path or a list of them; `exclude` folders are not scanned;
    symlinks out of `root` are followed only with `follow_symlinks` (see `scan_tree`).
    """
    if isinstance(annotations, (str, os.PathLike)):
        annotations = [annotations]
    if layout == "auto":
        layout = detect_layout(root, split_dir, annotations)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from auto, {', '.join(LAYOUTS)}")
    tree = scan_tree(root, exclude, follow_symlinks)
    if layout == "ucf101":
        scan = _ucf101(root, tree.videos, split_dir)
    elif layout == "hmdb51":
        scan = _hmdb51(root, tree.videos, split_dir)
    elif layout == "kinetics":
        scan = _kinetics(root, tree.videos, annotations)
    else:
        scan = _folder(tree.videos)
    return replace(scan, problems=tree.problems, outside=tree.outside)
