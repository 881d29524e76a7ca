"""The shared store of full-compute sets (rfc/run/store.py): list its entries, delete some or all.

    python scripts/store.py list                   # one line per entry
    python scripts/store.py clear 05623e144f7e29f0 # one entry (its setting_id, as in runs.csv)
    python scripts/store.py clear --all            # every entry, reference statistics and digests
    python scripts/store.py --store DIR list       # another store than outputs/store

An entry a job is drawing (or publishing) right now is never deleted: the job holds its lock, and
clear names that job and leaves the entry alone. Everything deleted is rebuilt on use: the next
run that needs a full-compute set draws it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from rfc.run.store import FULL_COMPUTE, list_entries
from rfc.utils.errors import FolderLockedError
from rfc.utils.files import DIGESTS, REFERENCES, FolderLock

ROOT = Path(__file__).resolve().parents[1]


def _describe(entry: dict) -> str:
    st = entry["setting"]
    what = (f"{st.get('model')} {st.get('sampler')}-{st.get('num_steps')} cfg {st.get('cfg_scale')} seed "
            f"{st.get('seed')} n={st.get('num_samples')} batch {st.get('batch_size')} {st.get('precision_mode')}"
            f"{'+compile' if st.get('compile') else ''} on {st.get('device')}") if st else "no setting.json"
    state = "in use: " + entry["busy"] if entry["busy"] else ("complete" if entry["complete"] else "incomplete")
    return f"{entry['id']}  {entry['bytes'] / 2**20:9.1f} MiB  {state:10s}  {what}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=ROOT / "outputs" / "store", help="paths.store of the runs")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    clear = sub.add_parser("clear")
    clear.add_argument("ids", nargs="*", help="setting ids (the setting_id column)")
    clear.add_argument("--all", action="store_true", help="every entry, plus reference statistics and digests")
    args = p.parse_args(argv)
    entries = list_entries(args.store / FULL_COMPUTE)
    if args.command == "list":
        for entry in entries:
            print(_describe(entry))
        if not entries:
            print(f"{args.store / FULL_COMPUTE}: no full-compute sets")
        return 0
    if not args.all and not args.ids:
        print("error: name the entries to clear (setting ids) or pass --all", file=sys.stderr)
        return 2
    known = {e["id"]: e for e in entries}
    unknown = [i for i in args.ids if i not in known]
    if unknown:
        print(f"error: no entry {', '.join(unknown)} in {args.store / FULL_COMPUTE} (see `list`)", file=sys.stderr)
        return 2
    code = 0
    for entry in entries if args.all else [known[i] for i in args.ids]:
        lock = FolderLock(entry["folder"])
        try:
            lock.acquire()  # held while deleting: no job can start drawing into it meanwhile
        except FolderLockedError as err:  # a job is drawing or publishing it
            print(f"kept {entry['id']}: {err}", file=sys.stderr)
            code = 1
            continue
        try:
            shutil.rmtree(entry["folder"])  # the lock file too: the held lock outlives its name
        finally:
            lock.release()
        print(f"deleted {entry['id']} ({entry['bytes'] / 2**20:.1f} MiB)")
    if args.all:
        shutil.rmtree(args.store / REFERENCES, ignore_errors=True)
        (args.store / DIGESTS).unlink(missing_ok=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
