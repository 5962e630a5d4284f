"""What data metacorrect knows, where it looks for it, and whether it is there.

``describe_datasets(data_dir)`` lists every registered dataset (plus CIFAR-10H, which sits
beside CIFAR-10 but has no loader) with its expected files under the data root, whether
they are present, and their SHA-256 status where the sum is known (the sums of the
project's ``shared/data`` files are embedded below; a ``SHA256SUMS`` file in the data root,
in ``sha256sum`` format, adds more). ``format_catalog(rows)`` renders them for
``metacorrect data``. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import REGISTRY
from .base import resolve_data_dir

# SHA-256 of the standard files, relative to the data root (from shared/data/SHA256SUMS)
KNOWN_SHA256 = {
    "cifar10/cifar10-jpg.tar.gz": "d8b28da9351d2cb36cc96483e9d1a201adc0f6ecc7c04fc87106239f297300d6",
    "cifar10/cifar10h-counts.npy": "9b36b4550349af56c79083356312eb4af856cc5fd3caf1f669d40b9d0bbb69ff",
    "cifar10/cifar10h-probs.npy": "436ae98620e00073f9d08585ac870573b588853e7af9f54eb1647408114af77d",
    "cifar10/cifar10n_labels.npz": "be0540029bef4278fb52f58861a17d2a78068f9b4329d6f126b354c01dfab2cf",
    "fashion-mnist/t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    "fashion-mnist/train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "fashion-mnist/train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "mnist/t10k-images-idx3-ubyte.gz": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "mnist/t10k-labels-idx1-ubyte.gz": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
    "mnist/train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "mnist/train-labels-idx1-ubyte.gz": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "sst/senti.binary.dev": "714684c8b26a523ad0d62dd18643ede449c141860d7977084f49fd8fa603d7aa",
    "sst/senti.binary.test": "67fee4647d936edc120f0a337cfd34e77fb863769913354ecadf19af01401eb2",
    "sst/senti.binary.train": "5917a64509c161c4d7582b39782e1766698add860313b3a224b2a51b283e483d",
    "twitter-pos/6mpaths": "63961360681878565b08906ff943491ae035496fc8d74fa669a2c35904f8cecc",
    "twitter-pos/tweets-dev.txt": "304eedc25cf601111ed2daac954092a026e11bc515effda8f9de09616e91dbc8",
    "twitter-pos/tweets-devtest.txt": "5bb2323a63a17d073468b9436980232e2e7b92d0dc1e5e46e722aae189229e3c",
    "twitter-pos/tweets-train.txt": "0eeb02801b1097aa32bfac490a61c0919c9e74f2c74dd0048b520041bf218f7c",
}

_CIFAR10_PICKLES = tuple(f"cifar-10-batches-py/{n}" for n in
                         ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                          "test_batch"))
# a file that other files can stand in for: {dataset: {file: files that replace it}}
ALTERNATIVES = {
    "cifar10": {"cifar10-jpg.tar.gz": _CIFAR10_PICKLES},
    "cifar10n": {"cifar10-jpg.tar.gz": _CIFAR10_PICKLES},
}
# files a loader uses when present but can do without
OPTIONAL = {"cifar10": {"cifar10n_labels.npz": "puts the JPEG training images in the original order"}}
# data that sits in the data root without a loader
EXTRA_ROWS = [{
    "name": "cifar10h", "folder": "cifar10", "files": ("cifar10h-probs.npy", "cifar10h-counts.npy"),
    "description": "CIFAR-10H human label distributions on the CIFAR-10 test set (no loader; the JPEG test "
                   "order matches the original only approximately)",
    "source": "jcpeterson/cifar-10h on GitHub", "licence": "CC BY-NC-SA 4.0 (non-commercial)"}]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_sha256sums(path: Path) -> dict[str, str]:
    """``sha256sum`` output (``<hex>  <relative path>`` lines) as ``{path: hex}``."""
    sums = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) == 2 and len(parts[0]) == 64:
                sums[parts[1].lstrip("*").strip()] = parts[0].lower()
    return sums


def _non_commercial(licence: str) -> bool:
    low = licence.lower()
    return any(mark in low for mark in ("by-nc", "non-commercial", "noncommercial"))


def _file_row(root: Path, folder: str, rel: str, sums: dict[str, str], verify: bool) -> dict:
    path = root / folder / rel if folder else root / rel
    key = f"{folder}/{rel}" if folder else rel
    row = {"path": str(path), "present": path.is_file(), "checksum": "missing"}
    if rel.endswith(".gz") and not row["present"] and path.with_suffix("").is_file():
        row.update(path=str(path.with_suffix("")), present=True, checksum="no known sum (uncompressed)")
        return row
    if row["present"]:
        if key not in sums:
            row["checksum"] = "no known sum"
        elif not verify:
            row["checksum"] = "not verified"
        else:
            row["checksum"] = "ok" if _sha256(path) == sums[key] else "MISMATCH"
    return row


def _describe(root: Path, name: str, folder: str, files, description: str, source: str, licence: str,
              sums: dict[str, str], verify: bool, loadable: bool = True) -> dict:
    optional = OPTIONAL.get(name, {})
    rows = []
    required_ok = True
    for rel in files:
        row = _file_row(root, folder, rel, sums, verify)
        row["optional"] = rel in optional
        alternative = ALTERNATIVES.get(name, {}).get(rel)
        if not row["present"] and alternative:
            alt_rows = [_file_row(root, folder, a, sums, verify) for a in alternative]
            if all(r["present"] for r in alt_rows):
                for r in alt_rows:
                    r["optional"] = False
                rows.extend(alt_rows)
                continue
            row["alternative"] = [str(root / folder / a) for a in alternative]
        rows.append(row)
        if not row["present"] and not row["optional"]:
            required_ok = False
    checks = {r["checksum"] for r in rows if r["present"]}
    if not files:
        status, checksum = "embedded", "-"
    else:
        status = "present" if required_ok else ("incomplete" if any(r["present"] for r in rows) else "missing")
        checksum = ("MISMATCH" if "MISMATCH" in checks else "ok" if checks == {"ok"}
                    else "partly verified" if "ok" in checks else "unverified" if checks else "-")
    return {"name": name, "description": description, "folder": str(root / folder) if folder else "(embedded)",
            "files": rows, "present": status in ("present", "embedded"), "status": status, "checksum": checksum,
            "source": source, "licence": licence, "non_commercial": _non_commercial(licence), "loadable": loadable,
            "notes": [f"{rel} is missing (optional: it {why})" for rel, why in optional.items()
                      if not any(r["present"] and r["path"].endswith(rel) for r in rows)]}


def describe_datasets(data_dir=None, verify: bool = True) -> list[dict]:
    """One dict per dataset: name, description, folder, files (path, present, checksum),
    present, status, checksum, source, licence, non_commercial, loadable, notes.

    ``verify=False`` skips hashing (checksum "not verified"). Never downloads.
    """
    root = resolve_data_dir(data_dir)
    sums = dict(read_sha256sums(root / "SHA256SUMS"))
    sums.update(KNOWN_SHA256)
    rows = [_describe(root, info.name, info.folder, info.files, info.description, info.source, info.licence,
                      sums, verify) for info in sorted(REGISTRY.values(), key=lambda i: i.name)]
    rows += [_describe(root, e["name"], e["folder"], e["files"], e["description"], e["source"], e["licence"],
                       sums, verify, loadable=False) for e in EXTRA_ROWS]
    for row in rows:
        row["data_root"] = str(root)
    return rows


def format_catalog(rows: list[dict]) -> str:
    """Render :func:`describe_datasets` rows as plain text for ``metacorrect data``."""
    lines = []
    if rows:
        lines.append(f"data root: {rows[0].get('data_root', '?')}  (--data-dir, else $METACORRECT_DATA, "
                     f"else ~/.local/share/metacorrect/data)")
        lines.append("")
    width = max([len(r["name"]) for r in rows] + [7])
    lines.append(f"{'dataset':<{width}}  {'status':<10}  {'checksum':<15}  licence")
    for r in rows:
        licence = r["licence"] + ("  [NON-COMMERCIAL]" if r["non_commercial"] else "")
        lines.append(f"{r['name']:<{width}}  {r['status']:<10}  {r['checksum']:<15}  {licence}")
        lines.append(f"{'':<{width}}  {r['description']}" + ("" if r["loadable"] else " [no loader]"))
        lines.append(f"{'':<{width}}  folder: {r['folder']}")
        for f in r["files"]:
            if not f["present"] and not f.get("optional"):
                alt = f" (or {', '.join(f['alternative'])})" if f.get("alternative") else ""
                lines.append(f"{'':<{width}}  missing: {f['path']}{alt}")
            elif f["checksum"] == "MISMATCH":
                lines.append(f"{'':<{width}}  checksum MISMATCH: {f['path']}")
        if r["status"] not in ("present", "embedded"):
            lines.append(f"{'':<{width}}  source: {r['source']}")
        for note in r["notes"]:
            lines.append(f"{'':<{width}}  note: {note}")
    lines.append("")
    lines.append("metacorrect never downloads: place missing files in the folders shown.")
    return "\n".join(lines)
