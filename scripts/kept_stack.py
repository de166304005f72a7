"""The command line shared by the scripts that measure a patch stack kept by `felix splice bench`."""

from __future__ import annotations

import argparse


def kept_stack_args(doc: str | None) -> argparse.Namespace:
    """CHECKPOINT EDITS STACK OUT [--n N], parsed, with gradients off for the measurement that follows."""
    import torch

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("edits")
    ap.add_argument("stack", help="the directory given to --keep-patches")
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--n", type=int, default=100)
    torch.set_grad_enabled(False)
    return ap.parse_args()
