"""`crossdiff verify`: recompute the checksum of every shard of activation stores; a bad shard is an InputError
naming it."""

import argparse

from ..data.store import ActivationStore
from ..errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register verify's arguments."""
    p.add_argument("store", nargs="+", help="activation store directory")


def run(args: argparse.Namespace) -> int:
    """Check every store; print one line per store. Returns 0 when every checksum matches.

    Raises:
        InputError: A shard is missing, truncated or fails its checksum (all bad shards named).
    """
    bad = []
    for path in args.store:
        store = ActivationStore(path)  # a missing or truncated shard fails here, by name
        checks = store.verify()
        counts = {status: sum(c.status == status for c in checks) for status in ("ok", "bad", "unchecked")}
        line = (
            f"{path}: {len(store.meta['shards'])} shards, {len(store)} rows, {len(checks)} files: "
            f"{counts['ok']} match their checksums"
        )
        if counts["bad"]:
            line += f", {counts['bad']} do not"
        if counts["unchecked"]:
            line += (
                f", {counts['unchecked']} unchecked (the store recorded no checksum for them: written before "
                "stores recorded checksums; only their sizes were checked)"
            )
        print(line)
        bad += [f"{path}: {c.file} fails its checksum ({c.detail})" for c in checks if c.status == "bad"]
    if bad:
        raise InputError("; ".join(bad))
    return 0
