"""Dataset layouts: which files are videos, their class, and which split each belongs to.

    kinetics  ROOT/{train,val,test}/<class>/<file>, or any tree plus the official CSV
              annotations `label,youtube_id,time_start,time_end,split` naming files
              `<youtube_id>_<start:06d>_<end:06d>.<ext>`; column `subset`.
    ucf101    ROOT/<class>/v_<Class>_gXX_cYY.avi plus ucfTrainTestlist/ (classInd.txt,
              trainlist0{1,2,3}.txt, testlist0{1,2,3}.txt); columns `split1..3`.
    hmdb51    ROOT/<class>/<video>.avi plus testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt
              (lines "<video>.avi 0|1|2": unused, train, test); columns `split1..3`.
    folder    any tree of videos; the first-level folder is the class when every video
              sits exactly one level deep, else unlabeled.

`scan_layout` returns a `Layout`; split files that name videos not on disk are counted
in `Layout.missing`, and malformed split files raise `SplitFileError` with file:line.
"""

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv")
LAYOUTS = ("kinetics", "ucf101", "hmdb51", "folder")
KINETICS_SUBSETS = {"train": "train", "val": "val", "validate": "val", "valid": "val", "test": "test"}
UCF_SPLIT_DIR, HMDB_SPLIT_DIR = "ucfTrainTestlist", "testTrainMulti_7030_splits"
HMDB_SPLIT = {"0": "unused", "1": "train", "2": "test"}


class SplitFileError(ValueError):
    """A malformed split or annotation file; the message starts with `file:line:`."""

    def __init__(self, path, line, message):
        super().__init__(f"{path}:{line}: {message}")


@dataclass
class Layout:
    """What a layout knows about the videos under a root (paths relative to it, '/' separated)."""

    name: str
    classes: list = field(default_factory=list)  # label -> class name
    videos: dict = field(default_factory=dict)  # relative path -> {"class_name": ..., "split1": ..., ...}
    missing: int = 0  # videos named in split files / annotations that are not on disk


def find_videos(root, exclude=()):
    """Relative paths of every video under `root` (by extension, recursive, sorted); skips hidden
    entries, temporary files and the directories in `exclude`."""
    root = Path(root)
    skip = {Path(e).resolve() for e in exclude}
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(folder) / d).resolve() not in skip)
        rel = Path(folder).relative_to(root)
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith("."):
                found.append((rel / name).as_posix())
    return sorted(found)


def detect_layout(root, split_dir=None, annotations=None):
    """'ucf101', 'hmdb51', 'kinetics' or 'folder', from the split files and folder names."""
    root = Path(root)
    split_dir = Path(split_dir) if split_dir else None
    if (root / UCF_SPLIT_DIR).is_dir() or (split_dir and (split_dir / "classInd.txt").is_file()):
        return "ucf101"
    if (root / HMDB_SPLIT_DIR).is_dir() or (split_dir and any(split_dir.glob("*_test_split1.txt"))):
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


def _labeled_entry(video):
    """`<class>/<file>`: the folder is the class; in no fold until a split file says so."""
    cls = video.split("/")[0] if "/" in video else ""
    return {"class_name": cls, "split1": "unused", "split2": "unused", "split3": "unused"}


def _ucf101(root, videos, split_dir):
    split_dir = Path(split_dir or Path(root) / UCF_SPLIT_DIR)
    class_file = split_dir / "classInd.txt"
    classes = []
    for n, line in _lines(class_file):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(classes) + 1:
            raise SplitFileError(class_file, n, f'expected "{len(classes) + 1} <ClassName>", got "{line}"')
        classes.append(parts[1])
    known = {c.lower(): i for i, c in enumerate(classes)}
    entries = {v: _labeled_entry(v) for v in videos}
    lookup, missing = _on_disk(entries), set()
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
                found = lookup(name)
                if found is None:
                    missing.add(name.lower())
                else:
                    entries[found][f"split{k}"] = subset
    return Layout("ucf101", classes, entries, len(missing))


def _hmdb51(root, videos, split_dir):
    split_dir = Path(split_dir or Path(root) / HMDB_SPLIT_DIR)
    pattern = re.compile(r"(.+)_test_split([123])\.txt$")
    files = sorted((m.group(1), int(m.group(2)), p) for p in split_dir.iterdir() if (m := pattern.match(p.name)))
    if not files:
        raise SplitFileError(split_dir, 0, "no <class>_test_split{1,2,3}.txt files")
    classes = sorted({cls for cls, _, _ in files})
    entries = {v: _labeled_entry(v) for v in videos}
    lookup, missing = _on_disk(entries), set()
    for cls, k, path in files:
        for n, line in _lines(path):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in HMDB_SPLIT or not parts[0].lower().endswith(VIDEO_EXTENSIONS):
                raise SplitFileError(path, n, f'expected "<video>.avi 0|1|2", got "{line}"')
            found = lookup(f"{cls}/{parts[0]}")
            if found is None:
                missing.add(f"{cls}/{parts[0]}".lower())
            else:
                entries[found][f"split{k}"] = HMDB_SPLIT[parts[1]]
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
    missing = 0
    if annotations:
        rows = {}
        for path in annotations:
            rows.update(_read_kinetics_csv(path))
        by_stem = {Path(v).stem: v for v in videos}
        for stem, (label, subset) in rows.items():
            v = by_stem.get(stem)
            if v is None:
                missing += 1
                continue
            entries[v]["class_name"] = label or entries[v]["class_name"]
            entries[v]["subset"] = subset or entries[v]["subset"]
    classes = sorted({e["class_name"] for e in entries.values() if e["class_name"]})
    return Layout("kinetics", classes, entries, missing)


def _folder(videos):
    labeled = bool(videos) and all(v.count("/") == 1 for v in videos)
    entries = {v: {"class_name": v.split("/")[0] if labeled else ""} for v in videos}
    return Layout("folder", sorted({e["class_name"] for e in entries.values()}) if labeled else [], entries)


def scan_layout(root, layout="auto", split_dir=None, annotations=None, exclude=()):
    """Find the videos under `root` and read their classes/splits -> Layout.

    `annotations` is a Kinetics CSV path or a list of them; `exclude` folders are not scanned.
    """
    if isinstance(annotations, (str, os.PathLike)):
        annotations = [annotations]
    if layout == "auto":
        layout = detect_layout(root, split_dir, annotations)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from auto, {', '.join(LAYOUTS)}")
    videos = find_videos(root, exclude)
    if layout == "ucf101":
        return _ucf101(root, videos, split_dir)
    if layout == "hmdb51":
        return _hmdb51(root, videos, split_dir)
    if layout == "kinetics":
        return _kinetics(root, videos, annotations)
    return _folder(videos)
