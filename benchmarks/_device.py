"""``--device``: run a benchmark under ``tf.device``, refusing cleanly when it does not exist."""

from __future__ import annotations

import contextlib


def device_scope(device: str | None):
    """``tf.device(device)`` (``"/GPU:0"``, ``"gpu"``, ``"/CPU:0"``), or no scope for None.

    Raises:
        SystemExit: naming the devices this machine has, when ``device`` is not one of them.
    """
    if device is None:
        return contextlib.nullcontext()
    import tensorflow as tf

    kind, _, index = device.strip().lstrip("/").upper().removeprefix("DEVICE:").partition(":")
    wanted = f"{kind}:{index or 0}"
    known = [d.name.removeprefix("/physical_device:") for d in tf.config.list_physical_devices()]
    if wanted not in known:
        raise SystemExit(f"--device: {device!r} does not exist on this machine (devices: "
                         f"{', '.join(known)}); leave --device out to use TensorFlow's default.")
    return tf.device(f"/{wanted}")
