"""Reading plotly figures back out of AppTest: chart specs by widget key, and plotly JSON arrays
(plotly ≥ 6 writes numeric arrays as {"dtype", "bdata" (base64), "shape"?}) as numpy."""

from __future__ import annotations

import base64
import json

import numpy as np
from streamlit.testing.v1 import AppTest


def decode(v: object) -> np.ndarray:
    """A plotly JSON array → float numpy array (None → NaN), reshaped when a shape is given."""
    if isinstance(v, dict) and "bdata" in v:
        arr = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).astype(float)
        if "shape" in v:
            shape = v["shape"]
            arr = arr.reshape([int(s) for s in shape.split(",")] if isinstance(shape, str) else list(shape))
        return arr
    return np.array(v, dtype=float)


def charts(at: AppTest) -> dict[str, dict]:
    """Every plotly chart of the last run, {widget key: figure spec}."""
    return {el.key: json.loads(el.proto.spec) for el in at.get("plotly_chart")}


def chart(at: AppTest, key_suffix: str) -> dict:
    """The spec of the (first) chart whose element id contains `key_suffix`."""
    for c in at.get("plotly_chart"):
        if c.proto.id and key_suffix in c.proto.id:
            return json.loads(c.proto.spec)
    raise AssertionError(f"no chart with key {key_suffix}: {[c.proto.id for c in at.get('plotly_chart')]}")
