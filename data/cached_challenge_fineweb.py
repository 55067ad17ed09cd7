"""Download the challenge's tokenized FineWeb from the Hugging Face hub into data/.

The hub repository holds a manifest.json that lists every tokenizer variant (sp1024, sp4096,
sp8192, byte260, ...): its dataset folder, its shards and its tokenizer files. This script fetches
the manifest first, then only the files of the variant asked for, into the layout train_gpt.py
reads (DATA_DIR=data/):

    data/datasets/fineweb10B_<variant>/fineweb_val_000000.bin, fineweb_train_000000.bin, ...
    data/tokenizers/fineweb_<V>_bpe.model, .vocab
    data/manifest.json  (the manifest, with the repository it came from under "_source")

Files already present with the right size are skipped, so an interrupted download resumes. The
manifest is always fetched again (the hub's cache makes that cheap), so one left by another
repository is replaced rather than silently used.

    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10
    MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf python3 data/cached_challenge_fineweb.py --variant sp8192

Environment: MATCHED_FINEWEB_REPO_ID (default willdepueoai/parameter-golf) and
MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (the folder of the repository holding manifest.json, default datasets).
"""
from __future__ import annotations

import argparse
import json
import os
import posixpath
import shutil
import sys

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
VARIANTS = ("sp1024", "sp4096", "sp8192", "byte260")


class FetchError(Exception):
    """A problem to report in one line (exit status 1)."""


def download(repo_id: str, remote_path: str, dest: str) -> None:
    """Fetch one file of the dataset repository to `dest`. The only network access of this script
    (tests replace it with a fake hub). The file lands in the hub cache and is then hard-linked (or
    copied) to `dest` through a temporary name, so `dest` never exists half-written."""
    from huggingface_hub import hf_hub_download
    folder, name = posixpath.split(remote_path)
    cached = hf_hub_download(repo_id=repo_id, filename=name, subfolder=folder or None, repo_type="dataset")
    source = os.path.realpath(cached)
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    partial = dest + ".partial"
    if os.path.lexists(partial):
        os.remove(partial)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copyfile(source, partial)
    os.replace(partial, dest)


# ---------------------------------------------------------------------------------------------
# Manifest: a tolerant reader
# ---------------------------------------------------------------------------------------------
# Paths in the manifest are relative to the remote root, e.g. "datasets/fineweb10B_sp1024/..." or
# "tokenizers/fineweb_1024_bpe.model" (a bare shard name is taken inside the dataset's folder,
# "path" or "datasets/<name>"). Accepted forms:
#   {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
#                  "stats": {"files_val": 1, "files_train": 80},            # shard counts, or
#                  "files": [{"path": "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
#                             "size": 123}, ...]},                          # explicit list (sizes optional)
#                 ...],                                                     # (or a dict keyed by name)
#    "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
#                    "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}, ...]}
# A file reference is a path string or {"path": ..., "size": ...}; shard lists may also be given
# as "val_files" / "train_files". Without a size, a present shard is checked by its header.


def _ref(item) -> tuple[str, int | None]:
    """(path, size or None) from a file reference: a string or a {"path"/"name", "size"/"bytes"} dict."""
    if isinstance(item, str):
        return item, None
    if isinstance(item, dict):
        path = item.get("path") or item.get("name") or item.get("filename")
        size = item.get("size", item.get("bytes"))
        if isinstance(path, str) and (size is None or isinstance(size, int)):
            return path, size
    raise FetchError(f"manifest.json: cannot read the file reference {item!r} (expected a path or "
                     f"{{\"path\": ..., \"size\": ...}})")


def _entries(value) -> list[dict]:
    """A manifest section as a list of dicts with a "name", whether given as a list or a dict."""
    if isinstance(value, dict):
        return [dict(v, name=v.get("name", k)) for k, v in value.items() if isinstance(v, dict)]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []


def _variant_of(entry: dict) -> str:
    name = str(entry.get("variant") or entry.get("name") or "")
    return name[len("fineweb10B_"):] if name.startswith("fineweb10B_") else name


def variant_files(manifest: dict, variant: str, train_shards: int, source: str) -> tuple[list, int]:
    """The files to fetch for `variant` as [(remote path, local path, size or None)] (paths relative
    to the remote root and to data/), and the number of train shards the repository has. Shards
    land in datasets/fineweb10B_<variant>/ and tokenizer files in tokenizers/, whatever the
    manifest's folders are called, because that is where train_gpt.py looks. `source` names the
    manifest in error messages."""
    datasets = _entries(manifest.get("datasets"))
    entry = next((d for d in datasets if _variant_of(d) == variant), None)
    if entry is None:
        have = ", ".join(sorted(_variant_of(d) for d in datasets)) or "none"
        hint = (" (the sp8192 data is at MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf)"
                if variant == "sp8192" else "")
        raise FetchError(f"--variant {variant} is not in {source} (it has: {have}){hint}")
    name = str(entry.get("name") or f"fineweb10B_{variant}")
    folder = str(entry.get("path") or entry.get("dir") or f"datasets/{name}").rstrip("/")

    refs = [_ref(f) for key in ("files", "val_files", "train_files") for f in entry.get(key) or []]
    refs = [(p if "/" in p else f"{folder}/{p}", s) for p, s in refs]
    by_path = dict(refs)  # a file listed twice is fetched once
    val = sorted((p, s) for p, s in by_path.items() if posixpath.basename(p).startswith("fineweb_val_"))
    train = sorted((p, s) for p, s in by_path.items() if posixpath.basename(p).startswith("fineweb_train_"))
    if not val and not train:  # counts only: the shard names follow the export's numbering
        stats = entry.get("stats") or entry
        try:
            n_val, n_train = int(stats["files_val"]), int(stats["files_train"])
        except (KeyError, TypeError, ValueError):
            raise FetchError(f"{source}: dataset {name} lists neither its shard files nor "
                             f"stats.files_val/files_train") from None
        val = [(f"{folder}/fineweb_val_{i:06d}.bin", None) for i in range(n_val)]
        train = [(f"{folder}/fineweb_train_{i:06d}.bin", None) for i in range(n_train)]
    if not val:
        raise FetchError(f"{source}: dataset {name} has no validation shards")

    tokenizer = entry.get("tokenizer")
    if not isinstance(tokenizer, dict):
        wanted = entry.get("tokenizer_name", tokenizer)
        if not wanted:
            raise FetchError(f"{source}: dataset {name} names no tokenizer (\"tokenizer_name\")")
        tokenizer = next((t for t in _entries(manifest.get("tokenizers")) if t.get("name") == wanted), None)
        if tokenizer is None:
            raise FetchError(f"{source}: dataset {name} names tokenizer {wanted!r}, which its \"tokenizers\" "
                             f"section does not list")
    tok_refs = [_ref(tokenizer[k]) for k in ("model_path", "vocab_path", "path") if tokenizer.get(k)]
    tok_refs += [_ref(f) for f in tokenizer.get("files") or []]
    if not tok_refs:
        raise FetchError(f"{source}: the tokenizer of dataset {name} lists no files")

    for ref, _ in val + train + tok_refs:
        if posixpath.basename(ref) in ("", ".", ".."):
            raise FetchError(f"{source}: {ref!r} does not name a file")
    local = f"datasets/fineweb10B_{variant}"
    files = [(r, f"{local}/{posixpath.basename(r)}", s) for r, s in val + train[:train_shards]]
    files += [(r, f"tokenizers/{posixpath.basename(r)}", s) for r, s in tok_refs]
    return files, len(train)


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------


def is_complete(path: str, size: int | None) -> bool:
    """Whether a local file can be kept: the manifest's size when it gives one, else for a shard a
    header that matches the file's length (train_gpt.read_shard's check), else mere presence."""
    if not os.path.isfile(path):
        return False
    if size is not None:
        return os.path.getsize(path) == size
    if path.endswith(".bin"):
        if os.path.dirname(DATA_DIR) not in sys.path:
            sys.path.insert(0, os.path.dirname(DATA_DIR))
        from train_gpt import ShardError, read_shard
        try:
            read_shard(path)
        except ShardError:
            return False
    return True


def fetch_manifest(repo_id: str, remote_root: str, data_dir: str, log) -> dict:
    """Download <remote_root>/manifest.json to data_dir/manifest.json, tagged with its source."""
    local = os.path.join(data_dir, "manifest.json")
    source = {"repo_id": repo_id, "remote_root": remote_root}
    if os.path.isfile(local):
        try:
            with open(local, encoding="utf-8") as f:
                old = json.load(f).get("_source")
        except (OSError, ValueError, AttributeError):
            old = None
        if old != source:
            origin = f"{old.get('repo_id')}:{old.get('remote_root')}" if isinstance(old, dict) else "an unknown source"
            log(f"{local} came from {origin}; replacing it with the manifest of {repo_id}:{remote_root}")
    remote = posixpath.join(remote_root, "manifest.json") if remote_root else "manifest.json"
    fresh = local + ".download"
    try:
        download(repo_id, remote, fresh)
    except Exception as e:  # noqa: BLE001 -- the hub raises many types; each is reported in one line
        raise FetchError(f"cannot download {remote} from the dataset repo {repo_id} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check "
                         f"MATCHED_FINEWEB_REPO_ID / MATCHED_FINEWEB_REMOTE_ROOT_PREFIX and the network") from None
    try:
        with open(fresh, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise FetchError(f"{repo_id}:{remote} is not a valid manifest ({e})") from None
    finally:
        if os.path.exists(fresh):
            os.remove(fresh)
    manifest["_source"] = source
    with open(local, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def fetch(variant: str, train_shards: int, data_dir: str | None = None, repo_id: str | None = None,
          remote_root: str | None = None, log=print) -> list[str]:
    """Download one variant into data_dir (default: this script's folder, data/); returns the local
    paths of all its files. repo_id and remote_root default to the environment, then the challenge's."""
    data_dir = data_dir or DATA_DIR
    repo_id = repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID") or DEFAULT_REPO_ID
    if remote_root is None:
        remote_root = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT)
    remote_root = remote_root.strip("/")
    manifest = fetch_manifest(repo_id, remote_root, data_dir, log)
    files, available = variant_files(manifest, variant, train_shards, f"{repo_id}:{remote_root}/manifest.json")
    if train_shards > available:
        log(f"{variant} has {available} train shards on {repo_id}; fetching all {available}")
    paths = []
    for i, (rel, local, size) in enumerate(files, 1):
        dest = os.path.join(data_dir, *local.split("/"))
        paths.append(dest)
        tag = f"[{i}/{len(files)}] {local}" + (f" ({size / 1e6:,.1f} MB)" if size is not None else "")
        if is_complete(dest, size):
            log(f"{tag}: present, skipped")
            continue
        remote = posixpath.join(remote_root, rel) if remote_root else rel
        try:
            download(repo_id, remote, dest)
        except Exception as e:  # noqa: BLE001
            raise FetchError(f"cannot download {remote} from {repo_id} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if size is not None and os.path.getsize(dest) != size:
            raise FetchError(f"{dest}: got {os.path.getsize(dest)} bytes but the manifest says {size}; "
                             f"the files of {repo_id} do not match its manifest")
        log(f"{tag}: downloaded")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=VARIANTS, default="sp1024", help="tokenizer variant (default sp1024)")
    p.add_argument("--train-shards", type=int, default=80, help="train shards to fetch, in order (default 80)")
    args = p.parse_args(argv)
    if args.train_shards < 0:
        p.error("--train-shards must be 0 or more")
    try:
        fetch(args.variant, args.train_shards, log=lambda m: print(m, flush=True))
    except FetchError as e:
        print(f"cached_challenge_fineweb: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
