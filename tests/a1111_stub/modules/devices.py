"""Stand-in for modules.devices: autocast is a no-op on CPU (as A1111's is for fp32)."""
import contextlib


def autocast(disable=False):
    return contextlib.nullcontext()
